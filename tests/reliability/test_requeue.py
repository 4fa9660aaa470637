"""A preempted job requeued with its command line unchanged (`resume=auto`), SLURM's SIGUSR1 warning, and
damaged checkpoints: real `python train.py` processes, real signals, real truncated files
(ldm/training/requeue.py, ldm/training/interrupt.py, ldm/checkpoints/io.py)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ldm.checkpoints.io import DamagedCheckpointError, check_training_checkpoint
from ldm.training.requeue import find_resume_checkpoint, resolve_ckpt_path
from tests.test_cli_runtime import QUICK, Training
from tests.test_resume import assert_same_as_full, per_step
from tests.tiny import REPO
from tests.train_utils import run_train, tiny_autoencoder_file

STEPS = 40  # 6-batch epochs (45 training images, batch 8): a stop at a random step is mid-epoch 5 times in 6


@pytest.fixture(scope="module")
def common(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("requeue")
    ae = tiny_autoencoder_file(root / "ae.safetensors")
    return [
        *[o for o in QUICK if o != "export=false"], f"model.autoencoder.path={ae}",
        f"paths.data_dir={root / 'data'}", "data.val_fraction=0.975", "logger=csv",
        f"model.lr_scheduler.total_steps={STEPS}", "model.lr_scheduler.warmup_steps=4",
        "model.log_buckets_every_n_steps=4",  # (assert_same_as_full compares them)
    ]  # fmt: skip


@pytest.fixture(autouse=True)
def _no_slurm(monkeypatch):
    """Outside SLURM, whatever runs the tests: Lightning's SLURMEnvironment would take SIGUSR1 otherwise."""
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)


def halve(path: Path) -> None:
    """Cut a file in half, as a copy or write that was killed midway leaves it."""
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


@pytest.mark.slow  # 48 s; fast: resume=auto below, SIGTERM's exit in test_cli_runtime, exactness test_resume
def test_requeue_after_sigterm_matches_the_uninterrupted_run(common, tmp_path):
    """SIGTERM mid-run, then the *same* command line again: the run continues from its last.ckpt and ends
    with the uninterrupted run's losses, checkpoint (weights, EMA, optimizer) and exported weights, bit for
    bit. The uninterrupted run has `resume=auto` too, in a fresh folder, where it is a no-op."""
    cmd = [*common, f"trainer.max_steps={STEPS}", "resume=auto"]
    part, full = tmp_path / "part", tmp_path / "full"
    run = Training(part, *cmd)
    run.wait_for_step(3)
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 143, run.output[-4000:]
    assert "resuming from" not in run.output  # a fresh folder: nothing to resume
    stopped = check_training_checkpoint(part / "checkpoints" / "last.ckpt")["global_step"]
    assert 3 <= stopped < STEPS

    again = run_train(part, *cmd)  # the requeued job
    assert f"resuming from {part / 'checkpoints' / 'last.ckpt'}" in again.stdout
    fresh = run_train(full, *cmd)
    assert "resuming from" not in fresh.stdout
    assert [p.name for p in (full / "csv").iterdir()] == ["version_0"]
    assert min(per_step(full, "train/loss")) == 0
    assert_same_as_full(full, part, range(STEPS))


@pytest.fixture(scope="module")
def damaged_run(common, tmp_path_factory) -> Path:
    """A finished 6-step run with checkpoints at steps 2, 4, 6 and last.ckpt (step 6)."""
    run = tmp_path_factory.mktemp("requeue") / "run"
    run_train(run, *common, "trainer.max_steps=6", "callbacks.model_checkpoint.every_n_train_steps=2")
    return run


def test_a_damaged_checkpoint_is_named_at_start_up_and_skipped_by_resume_auto(common, damaged_run, tmp_path):
    ckpts = damaged_run / "checkpoints"
    names = {p.name for p in ckpts.glob("*.ckpt")}
    assert names == {"last.ckpt", *(f"step000000{i}.ckpt" for i in (2, 4, 6))}
    # Newest by recorded step, not by file time: a best-*.ckpt copied later from step 2 does not win.
    shutil.copy(ckpts / "step0000002.ckpt", ckpts / "best-0.ckpt")
    assert find_resume_checkpoint(damaged_run).name in ("last.ckpt", "step0000006.ckpt")
    halve(ckpts / "last.ckpt")
    halve(ckpts / "step0000006.ckpt")

    # ckpt_path= on a damaged file: one line naming it and what is wrong, before data or model are built.
    cmd = [sys.executable, str(REPO / "train.py"), *common, "trainer.max_steps=8",
           f"ckpt_path={ckpts / 'last.ckpt'}", f"hydra.run.dir={tmp_path / 'other'}"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{ckpts / 'last.ckpt'}: not a complete torch checkpoint" in proc.stderr
    assert "truncated" in proc.stderr
    assert "Traceback" not in proc.stderr and "zip" not in proc.stderr.replace("zip directory", "")
    assert not (tmp_path / "other" / "config_resolved.yaml").exists()  # failed before anything was built

    # resume=auto: both damaged files named in a warning, the newest good one (step 4) resumed.
    out = run_train(damaged_run, *common, "trainer.max_steps=8", "resume=auto")
    for name in ("last.ckpt", "step0000006.ckpt"):
        assert f"resume=auto skips a damaged checkpoint: {ckpts / name}: not a complete" in out.stderr
    assert f"resuming from {ckpts / 'step0000004.ckpt'}" in out.stdout
    assert check_training_checkpoint(ckpts / "last.ckpt")["global_step"] == 8  # rewritten, whole
    assert sorted(per_step(damaged_run, "train/loss")) == list(range(8))


def test_resolve_ckpt_path_without_checkpoints(tmp_path):
    """resume=auto in a folder without checkpoints: a fresh start, or `ckpt_path` when given."""
    assert find_resume_checkpoint(tmp_path) is None
    assert resolve_ckpt_path("auto", None, tmp_path) is None
    assert resolve_ckpt_path(None, "last", tmp_path) == "last"  # Lightning's keywords pass through
    with pytest.raises(DamagedCheckpointError, match="no such checkpoint file"):
        resolve_ckpt_path("auto", tmp_path / "missing.ckpt", tmp_path)


def test_truncated_safetensors_export_is_named_by_load_pipeline(damaged_run, tmp_path):
    """The export's weights cut in half: ldm.load_pipeline names the file and the sizes (safetensors' own
    message, "incomplete metadata, file not fully covered", names neither)."""
    from ldm import load_pipeline

    export = shutil.copytree(damaged_run / "export", tmp_path / "export")
    single = shutil.copy(export / "model.safetensors", tmp_path / "single.safetensors")
    for target, weights in ((export, export / "model.safetensors"), (single, single)):
        halve(Path(weights))
        with pytest.raises(DamagedCheckpointError, match=rf"{weights}: truncated \.safetensors file"):
            load_pipeline(target)


def test_sigusr1_outside_slurm_saves_and_exits_138(common, tmp_path):
    """SLURM's warning signal (`sbatch --signal=USR1@90`) outside Lightning's SLURM auto-requeue: the step
    finishes, last.ckpt is written, and the exit status (128 + SIGUSR1) tells the job script to requeue."""
    run = Training(tmp_path, *common, "trainer.max_steps=400", "export=false")
    run.wait_for_step(2)
    run.proc.send_signal(signal.SIGUSR1)
    assert run.finish() == 128 + signal.SIGUSR1 == 138, run.output[-4000:]
    assert "SIGUSR1: stopping after this step" in run.output
    assert 2 <= check_training_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] < 400


def test_lightning_slurm_requeue_handler_is_left_alone(monkeypatch, tmp_path):
    """Under SLURM with auto_requeue, Lightning's own SIGUSR1 handler (save hpc_ckpt, `scontrol requeue`;
    signal_connector.py) stays installed while training: InterruptCheckpoint does not replace it."""
    import pytorch_lightning as pl
    from pytorch_lightning.demos.boring_classes import BoringModel

    from ldm.training.interrupt import InterruptCheckpoint

    for key, value in {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "train",
                       "SLURM_JOB_ID": "1", "SLURM_NODELIST": "localhost", "SLURM_PROCID": "0",
                       "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    seen = []

    class Look(pl.Callback):
        def on_train_batch_end(self, *args) -> None:
            seen.append(signal.getsignal(signal.SIGUSR1))

    ours = InterruptCheckpoint()
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[ours, Look()])  # fmt: skip
    assert type(trainer._accelerator_connector.cluster_environment).__name__ == "SLURMEnvironment"
    trainer.fit(BoringModel())
    assert seen and type(seen[0]).__name__ == "_HandlersCompose"  # Lightning's, not ours
    assert signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None)  # and put back afterwards
