"""Requeue-safe training: `resume=auto` picks the run folder's newest checkpoint that verifies, every
checkpoint given by path is verified before anything is built, and Lightning's checkpoint writes are made
atomic and durable (`AtomicCheckpointIO`).

A preempted job is requeued with its command line unchanged (SLURM's `--requeue`, `scontrol requeue`):
`python train.py ... hydra.run.dir=RUN resume=auto` starts fresh in an empty RUN and continues from
RUN's newest good checkpoint otherwise.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities.cloud_io import get_filesystem

from ldm.checkpoints.io import DamagedCheckpointError, atomic_write, check_training_checkpoint


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def checkpoint_candidates(run_dir: str | os.PathLike) -> list[Path]:
    """The checkpoints a run folder may resume from: `checkpoints/*.ckpt` (last.ckpt, stepNNNNNNN.ckpt,
    best-*.ckpt, ...) and, when Lightning's SLURM auto-requeue saved one, `hpc_ckpt_N.ckpt` in the
    trainer's default_root_dir (the run folder; pytorch_lightning/trainer/connectors/
    checkpoint_connector.py `hpc_save_path`)."""
    run = Path(run_dir)
    return sorted([*(run / "checkpoints").glob("*.ckpt"), *run.glob("hpc_ckpt_*.ckpt")])


def find_resume_checkpoint(run_dir: str | os.PathLike, warn: Callable[[str], None] = _warn) -> Path | None:
    """The newest checkpoint of `run_dir` that verifies (`check_training_checkpoint`), newest by its
    recorded global_step, then by modification time; None in a folder without checkpoints. Each damaged
    one is skipped with a warning that names it and says what is wrong."""
    found: list[tuple[int, float, Path]] = []
    for path in checkpoint_candidates(run_dir):
        try:
            info = check_training_checkpoint(path)
        except DamagedCheckpointError as err:
            warn(f"resume=auto skips a damaged checkpoint: {err}")
            continue
        found.append((int(info.get("global_step", -1)), path.stat().st_mtime, path))
    return max(found)[2] if found else None


def resolve_ckpt_path(resume: Any, ckpt_path: Any, run_dir: str | os.PathLike,
                      warn: Callable[[str], None] = _warn) -> str | None:  # fmt: skip
    """What `trainer.fit(ckpt_path=...)` gets, from the config's `resume` and `ckpt_path`, verified.

    - `resume=auto`: the run folder's newest good checkpoint; in a folder without one, `ckpt_path` (so
      `ckpt_path=OTHER/last.ckpt resume=auto` starts from OTHER once, then follows its own checkpoints
      when requeued), or None: a fresh start.
    - `resume=PATH` is `ckpt_path=PATH`.
    - a path (either key) is verified here, before data and model are built: a damaged file fails at once
      with DamagedCheckpointError naming it, instead of after the model is built with a zip traceback.
    Lightning's keywords ("last", "hpc", "best", "registry...") pass through unchanged.
    """
    if resume is not None and str(resume) != "auto":
        if ckpt_path is not None and str(ckpt_path) != str(resume):
            raise ValueError(f"resume={resume} and ckpt_path={ckpt_path} disagree: give one of them")
        ckpt_path = resume
    elif resume is not None:
        found = find_resume_checkpoint(run_dir, warn)
        if found is not None:
            return str(found)
    if ckpt_path is None:
        return None
    path = str(ckpt_path)
    if path in ("last", "hpc", "best") or path.startswith("registry") or "://" in path:
        return path
    check_training_checkpoint(path)
    return path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO, writing local files through `ldm.checkpoints.io.atomic_write`:
    a temporary file in the checkpoint's own folder, fsync, rename, fsync of the folder.

    Lightning's own write (lightning_fabric/utilities/cloud_io.py `_atomic_save`) goes through an fsspec
    transaction, and fsspec's LocalFileOpener (fsspec/implementations/local.py) writes the deferred file
    to `tempfile.mkstemp()` - the system temp folder - and commits with `shutil.move`. Where /tmp and the
    run folder are different file systems (node-local /tmp, run folder on NFS/Lustre: the usual cluster)
    shutil.move copies into the final name, so a job killed during that copy leaves a truncated
    last.ckpt in place of the good one; nothing is fsync'd either. Remote URLs keep Lightning's path.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        protocol = get_filesystem(path).protocol
        local = "file" in (protocol if isinstance(protocol, tuple) else (protocol,))
        if storage_options is not None or not local:
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def use_atomic_checkpoint_io(trainer: Any) -> None:
    """Give `trainer` an AtomicCheckpointIO where it uses Lightning's plain TorchCheckpointIO (single
    device, DDP); strategies with their own checkpoint IO (FSDP's sharded files, async IO) keep theirs."""
    strategy = trainer.strategy
    if type(getattr(strategy, "_checkpoint_io", None)) in (TorchCheckpointIO, type(None)):
        strategy.checkpoint_io = AtomicCheckpointIO()
