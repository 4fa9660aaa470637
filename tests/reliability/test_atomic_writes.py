"""A checkpoint write killed midway leaves the previous checkpoint whole (ldm/training/requeue.py
AtomicCheckpointIO, ldm/checkpoints/io.py atomic_write).

The kill is real: the writing process runs under RLIMIT_FSIZE, so the kernel kills it with SIGXFSZ
(setrlimit(2)) when a file it writes passes the limit, part way through the checkpoint; no Python cleanup
runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm.checkpoints.io import check_training_checkpoint, write_state_dict
from ldm.training.requeue import AtomicCheckpointIO, find_resume_checkpoint, use_atomic_checkpoint_io
from tests.tiny import REPO


def checkpoint(step: int) -> dict:
    """An 8 MB training checkpoint for `step`, its weights all equal to `step`."""
    w = torch.full((2_000_000,), float(step))
    return {"state_dict": {"w": w}, "global_step": step, "loops": {}, "optimizer_states": []}


KILLED_WRITE = """
import resource, signal, sys
from ldm.training.requeue import AtomicCheckpointIO
from tests.reliability.test_atomic_writes import checkpoint
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it (writes would fail with EFBIG): be killed
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), int(sys.argv[3])))
AtomicCheckpointIO().save_checkpoint(checkpoint(int(sys.argv[2])), sys.argv[1])
"""


def save(path: Path, step: int, limit: int = 0) -> int:
    """Write the checkpoint of `step` and return the exit status: here, or with `limit` in a fresh process
    that the kernel kills once it has written that many bytes."""
    if not limit:  # (a fresh process costs ~8 s of imports: only the killed write needs one)
        AtomicCheckpointIO().save_checkpoint(checkpoint(step), path)
        return 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-c", KILLED_WRITE, str(path), str(step), str(limit)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    return proc.returncode


def test_checkpoint_write_killed_midway_leaves_the_previous_file(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    assert save(path, 1) == 0
    assert save(path, 2, limit=3_000_000) == -signal.SIGXFSZ  # killed after 3 of 8 MB
    assert check_training_checkpoint(path)["global_step"] == 1  # the previous checkpoint, whole
    assert torch.load(path, weights_only=True)["state_dict"]["w"].eq(1).all()
    assert find_resume_checkpoint(tmp_path) == path  # the killed write's hidden .tmp is not a candidate
    assert save(path, 3) == 0 and check_training_checkpoint(path)["global_step"] == 3
    # (Lightning's own TorchCheckpointIO passes this too when the system temp folder is on the run folder's
    # file system; where it is not, its final `shutil.move` is a copy into last.ckpt: see AtomicCheckpointIO.)


def test_export_write_failing_midway_leaves_the_previous_file(tmp_path):
    """write_state_dict (exports, autoencoder files) through atomic_write: a tensor that cannot be written
    (safetensors refuses it after the others were laid out) leaves the old file and no temporary."""
    path = tmp_path / "model.safetensors"
    write_state_dict(path, {"w": torch.ones(10)})
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017
        write_state_dict(path, {"w": torch.zeros(10), "bad": torch.zeros(2, 2).to_sparse()})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_train_py_trainer_writes_through_atomic_checkpoint_io():
    """train.py's trainer (single device here; DDP the same) saves through AtomicCheckpointIO."""
    import pytorch_lightning as pl

    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    use_atomic_checkpoint_io(trainer)
    assert type(trainer.strategy.checkpoint_io) is AtomicCheckpointIO
