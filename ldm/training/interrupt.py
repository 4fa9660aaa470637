"""Ctrl-C, SIGTERM and SIGUSR1 stop a run at the end of the current step and write `checkpoints/last.ckpt`,
so an interrupted run resumes with the same command line plus `resume=auto` (or
`ckpt_path=<run>/checkpoints/last.ckpt`)."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_info


class InterruptCheckpoint(pl.Callback):
    """Saves `<dirpath>/last.ckpt` when a run is stopped by SIGTERM (a scheduler's preemption, `kill`), by
    SIGUSR1 (SLURM's warning before the time limit, `sbatch --signal=USR1@90`) or by a first Ctrl-C, then
    exits with 143, 138 or 130 (128 + the signal, the shell's convention), so a job script can tell a
    preemption from a crash and requeue: `python train.py ... resume=auto; [ $? = 138 ] && scontrol
    requeue $SLURM_JOB_ID`.

    SIGUSR1 under Lightning's SLURM auto-requeue: when the job runs under SLURM and the trainer's
    SLURMEnvironment has `auto_requeue` (its default), Lightning installs its own SIGUSR1 handler, which
    saves `<default_root_dir>/hpc_ckpt_N.ckpt` and calls `scontrol requeue` itself
    (pytorch_lightning/trainer/connectors/signal_connector.py `_slurm_sigusr_handler_fn`). That handler is
    then left alone (`resume=auto` finds the hpc checkpoint too); only where SIGUSR1 has no handler when
    training starts is it routed here. Lightning's handler saves at whatever moment the signal arrives,
    possibly inside a step; `plugins: [{_target_: lightning_fabric.plugins.environments.SLURMEnvironment,
    auto_requeue: false}]` on the trainer hands SIGUSR1 to this step-boundary path instead.

    Lightning already turns SIGTERM into a clean stop: its signal handler only sets a flag, the training
    loop raises `SIGTERMException` once the current batch is done (every ModelCheckpoint has run, the EMA
    is updated) and hands it to the callbacks' `on_exception` (pytorch_lightning/trainer/connectors/
    signal_connector.py, loops/training_epoch_loop.py `on_advance_end`). The state saved there is a step
    boundary, the same state a periodic checkpoint captures. Ctrl-C, by contrast, raises KeyboardInterrupt
    wherever Python happens to be, possibly half way through an optimizer step; so while training, the
    first Ctrl-C is routed to that same SIGTERM path. A second Ctrl-C raises KeyboardInterrupt at once,
    and nothing is written then (the last periodic or time-based checkpoint stays). ModelCheckpoint's own
    `save_on_exception` is not used because it saves on every exception: a run stopped by NaN weights
    would overwrite last.ckpt with them.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "last.ckpt"):
        self.dirpath, self.filename = dirpath, filename
        self._trainer: pl.Trainer | None = None
        self._previous: dict[int, Any] = {}
        self._signal: int | None = None  # the signal that stopped the run, when it was not SIGTERM

    def path(self, trainer: pl.Trainer) -> Path:
        """Where the checkpoint goes: `dirpath`, else the run's ModelCheckpoint folder, else
        <default_root_dir>/checkpoints."""
        folder = self.dirpath or getattr(trainer.checkpoint_callback, "dirpath", None)
        return Path(folder or Path(trainer.default_root_dir) / "checkpoints") / self.filename

    def _on_sigint(self, signum: int, frame: Any) -> None:
        trainer = self._trainer
        fitting = trainer is not None and trainer.state.fn == TrainerFn.FITTING
        if self._signal is not None or not fitting or trainer.sanity_checking:
            raise KeyboardInterrupt
        self._signal = signal.SIGINT
        print("\nCtrl-C: stopping after this step and saving a checkpoint (Ctrl-C again: stop now, "
              "without saving)", file=sys.stderr, flush=True)  # fmt: skip
        signal.raise_signal(signal.SIGTERM)  # Lightning's handler: stop at the next batch boundary

    def _on_sigusr1(self, signum: int, frame: Any) -> None:
        if self._signal is not None:
            return  # already stopping
        self._signal = signal.SIGUSR1
        print("\nSIGUSR1: stopping after this step and saving a checkpoint", file=sys.stderr, flush=True)
        signal.raise_signal(signal.SIGTERM)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Installed here, after Lightning has registered its SIGTERM handler (Trainer._run). Python only
        # lets the main thread set signal handlers.
        if threading.current_thread() is threading.main_thread():
            self._trainer, self._signal = trainer, None
            self._previous = {signal.SIGINT: signal.signal(signal.SIGINT, self._on_sigint)}
            usr1 = getattr(signal, "SIGUSR1", None)  # not on Windows
            if usr1 is not None and signal.getsignal(usr1) in (None, signal.SIG_DFL):
                self._previous[usr1] = signal.signal(usr1, self._on_sigusr1)

    def _restore(self) -> None:
        if self._trainer is not None and threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
        self._trainer, self._previous = None, {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: Any, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        if trainer.fast_dev_run or trainer.sanity_checking:
            return
        path = self.path(trainer)
        trainer.save_checkpoint(path)  # every rank calls it (it has a barrier); rank 0 writes
        run = Path(trainer.default_root_dir).resolve()
        rank_zero_info(
            f"interrupted at step {trainer.global_step}: saved {path}\nresume in the same folder: "
            f"python train.py <same arguments> hydra.run.dir={run} resume=auto"
        )
        # SIGTERMException is a SystemExit without a code, i.e. exit status 0, which would let
        # `python train.py && next-step` carry on; report the signal as the shell does instead.
        exception.code = 128 + int(self._signal or signal.SIGTERM)
        self._restore()
