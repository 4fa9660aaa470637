"""Exact resume through `python train.py ... ckpt_path=`: whatever checkpoint a run wrote (periodic, last,
at max_steps, on Ctrl-C, on an exception; between or at epoch boundaries; finite epochs, a resampled
stream or an image folder; with gradient accumulation), continuing from it gives the logged losses and
epochs of the run that was never stopped, and its checkpoint and exported weights (EMA included) bit for
bit (ldm/training/resume.py, ldm/data/webdataset.py `resume_position`, ldm/data/folder.py `EpochSampler`).

The digits with 97.5% held out leave 45 training images: batch 8 makes 6-batch epochs (the last one
short), so a few dozen steps cross several epoch boundaries. The default run holds the cases that failed
before the fix and cost little; `-m slow` adds the rest and the report's own 240-step commands.
"""

from __future__ import annotations

import csv
import signal
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from safetensors.torch import load_file

from tests.train_utils import FAST, run_train, tiny_autoencoder_file

STEPS = 16  # epochs: steps 0-5, 6-11, 12-15 (the last one cut by max_steps)


@pytest.fixture(scope="module")
def common(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("resume")
    ae = tiny_autoencoder_file(root / "ae.safetensors")
    return [
        "experiment=digits", f"model.autoencoder.path={ae}", f"paths.data_dir={root / 'data'}", *FAST,
        "data.val_fraction=0.975", "logger=csv", f"model.lr_scheduler.total_steps={STEPS}",
        "model.lr_scheduler.warmup_steps=4", "callbacks.model_checkpoint.every_n_train_steps=1000",
        "model.log_buckets_every_n_steps=4",  # windows that a resume cuts: the means must not change
    ]  # fmt: skip


@pytest.fixture(scope="module")
def full(common, tmp_path_factory) -> Path:
    """The uninterrupted run, with a checkpoint every 2 steps to resume from."""
    run = tmp_path_factory.mktemp("resume") / "full"
    run_train(run, *common, f"trainer.max_steps={STEPS}", "callbacks.model_checkpoint.every_n_train_steps=2")
    return run


class InterruptAt(pl.Callback):
    """Stops a run as a user would, at a chosen batch: `how="sigint"` sends this process SIGINT (Ctrl-C)
    at the end of the batch, `how="keyboard_interrupt"` raises KeyboardInterrupt inside the training step,
    after the backward pass and before the optimizer step (a Ctrl-C that lands there)."""

    def __init__(self, epoch: int, batch: int, how: str = "sigint"):
        self.epoch, self.batch, self.how = epoch, batch, how

    def _here(self, trainer: pl.Trainer) -> bool:
        loop = trainer.fit_loop.epoch_loop
        return trainer.current_epoch == self.epoch and loop.batch_progress.current.ready - 1 == self.batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.how == "sigint" and self._here(trainer):
            signal.raise_signal(signal.SIGINT)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.how == "keyboard_interrupt" and self._here(trainer):
            raise KeyboardInterrupt


def interrupted(run: Path, *overrides: str, epoch: int, batch: int, how: str = "sigint") -> None:
    """A run of `train.py` stopped by `InterruptAt`; it must exit with an error status."""
    stop = [
        "+callbacks.stop._target_=tests.test_resume.InterruptAt", f"+callbacks.stop.epoch={epoch}",
        f"+callbacks.stop.batch={batch}", f"+callbacks.stop.how={how}",
    ]  # fmt: skip
    with pytest.raises(AssertionError, match=r"train.py failed \((1|130)\)"):
        run_train(run, *overrides, *stop)


def resume(run: Path, *overrides: str, steps: int, ckpt: Path | None = None) -> None:
    """`train.py ... trainer.max_steps=steps ckpt_path=...` into `run` (from its own last.ckpt by default)."""
    ckpt = ckpt or run / "checkpoints" / "last.ckpt"
    run_train(run, *overrides, f"trainer.max_steps={steps}", f"ckpt_path={ckpt}")


def per_step(run: Path, key: str) -> dict[int, str]:
    """step -> the CSV text of `key`, over all of the run's logger versions (a resume logs to the next)."""
    out: dict[int, str] = {}
    for version in sorted((run / "csv").glob("version_*"), key=lambda p: int(p.name.split("_")[1])):
        with open(version / "metrics.csv") as f:
            for row in csv.DictReader(f):
                if row.get(key):
                    out[int(row["step"])] = row[key]
    return out


def assert_identical(a, b, where: str) -> None:
    """Nested dicts / lists of tensors and numbers are equal, tensors bit for bit."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def assert_same_as_full(full: Path, run: Path, steps: range, buckets_every: int = 4) -> None:
    """`run` logged the same loss and epoch as `full` at every step of `steps`, and the same timestep-bucket
    losses (`model.log_buckets_every_n_steps=buckets_every`), and ends with the same checkpoint (weights,
    EMA, optimizer) and exported weights, bit for bit."""
    for key in ("train/loss", "epoch"):
        a, b = per_step(full, key), per_step(run, key)
        assert set(steps) <= set(b), f"{key}: steps {sorted(set(steps) - set(b))} not logged"
        # The logged loss is a mean whose summation order can follow memory alignment, which differs
        # between processes, so it may differ in the last bits (its gradient, a constant, does not): the
        # weights below are compared bit for bit, the losses to within a few float32 ulps.
        diff = [(s, a[s], b[s]) for s in steps if float(a[s]) != pytest.approx(float(b[s]), rel=1e-6, abs=0)]
        assert not diff, f"{key} differs at (step, uninterrupted, resumed): {diff[:5]}"
    # Timestep-bucket losses, means over windows of `buckets_every` steps logged at their last step
    # (Lightning re-sends a value at its later flushes until the epoch ends, which a resumed process does
    # not: compared where logged): the checkpoint holds the window's completed steps, so the resumed run
    # logs the same.
    logged_at = [s for s in steps if (s + 1) % buckets_every == 0]
    for k in range(10):
        key = f"train/loss_t{k}00-{k}99"
        a, b = per_step(full, key), per_step(run, key)
        a, b = ({s: float(v) for s, v in d.items() if s in logged_at} for d in (a, b))
        assert sorted(a) == logged_at, (key, sorted(a))
        assert a.keys() == b.keys(), key
        diff = [(s, a[s], b[s]) for s in a if b[s] != pytest.approx(a[s], rel=1e-6, nan_ok=True)]
        assert not diff, f"{key} differs at (step, uninterrupted, resumed): {diff[:5]}"
    ca = torch.load(full / "checkpoints" / "last.ckpt", weights_only=True)
    cb = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ca["global_step"] == cb["global_step"]  # (its "epoch" depends on the moment it was written)
    for name in ("state_dict", "ema", "optimizer_states", "lr_schedulers"):
        assert_identical(ca[name], cb[name], name)
    files = sorted(p.relative_to(full / "export") for p in (full / "export").rglob("*.safetensors"))
    assert files
    for f in files:
        wa, wb = load_file(full / "export" / f), load_file(run / "export" / f)
        assert wa.keys() == wb.keys() and all(torch.equal(v, wb[k]) for k, v in wa.items()), f


@pytest.mark.slow  # 37 s; the same checkpoint-to-more-steps path runs fast in README's resume commands
def test_extending_a_finished_run_twice(common, full, tmp_path):
    """The most common resume: train to N steps, then continue to more. max_steps=9 stops mid-epoch (the
    checkpoint is written after Lightning ran the epoch's end), 12 stops exactly at an epoch's end."""
    run = tmp_path / "extended"
    run_train(run, *common, "trainer.max_steps=9")
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert (last["global_step"], last["epoch"]) == (9, 1)  # epoch 1 is still open
    for steps in (12, STEPS):
        resume(run, *common, steps=steps)
    assert_same_as_full(full, run, range(STEPS))


def test_resume_from_periodic_checkpoint_at_an_epoch_end(common, full, tmp_path):
    """Written in on_train_batch_end of an epoch's last batch (step 6 = batch 5 of epoch 0)."""
    run = tmp_path / "from6"
    resume(run, *common, steps=STEPS, ckpt=full / "checkpoints" / "step0000006.ckpt")
    assert_same_as_full(full, run, range(6, STEPS))


@pytest.mark.parametrize(
    "batch, step", [(5, 12), pytest.param(3, 10, marks=pytest.mark.slow)], ids=["epoch_end", "mid_epoch"]
)
def test_resume_after_ctrl_c(common, full, tmp_path, batch, step):
    """Ctrl-C at an epoch's last batch or mid-epoch: the run finishes the step (and the epoch's end, at
    its last batch), writes last.ckpt and exits; resuming continues."""
    run = tmp_path / "ctrl_c"
    interrupted(run, *common, f"trainer.max_steps={STEPS}", epoch=1, batch=batch)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == step
    resume(run, *common, steps=STEPS)
    assert_same_as_full(full, run, range(STEPS))


@pytest.mark.slow
def test_resume_from_periodic_checkpoint_mid_epoch(common, full, tmp_path):
    run = tmp_path / "from8"
    resume(run, *common, steps=STEPS, ckpt=full / "checkpoints" / "step0000008.ckpt")
    assert_same_as_full(full, run, range(8, STEPS))


@pytest.mark.slow
def test_resume_after_an_exception_inside_a_step(common, full, tmp_path):
    """KeyboardInterrupt between backward and optimizer step; Lightning's ModelCheckpoint(save_on_exception)
    writes the checkpoint with that batch fetched but not trained: it is trained again on resume."""
    run, save = tmp_path / "exception", "+callbacks.model_checkpoint.save_on_exception=true"
    interrupted(run, *common, save, f"trainer.max_steps={STEPS}", epoch=1, batch=2, how="keyboard_interrupt")
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8
    resume(run, *common, save, steps=STEPS)
    assert_same_as_full(full, run, range(STEPS))


@pytest.mark.slow
def test_resume_with_gradient_accumulation(common, tmp_path):
    """2 batches a step, so 3 steps an epoch: stopped at max_steps mid-epoch, then by Ctrl-C after the
    first batch of a window (its gradient is lost: the window is trained again), then run to the end."""
    acc = [*common, "trainer.accumulate_grad_batches=2"]
    reference, run = tmp_path / "acc_full", tmp_path / "acc"
    run_train(reference, *acc, "trainer.max_steps=8")
    run_train(run, *acc, "trainer.max_steps=4")
    last = run / "checkpoints" / "last.ckpt"
    interrupted(run, *acc, "trainer.max_steps=8", f"ckpt_path={last}", epoch=1, batch=2)
    assert torch.load(last, weights_only=True)["global_step"] == 4
    resume(run, *acc, steps=8)
    assert_same_as_full(reference, run, range(8))


@pytest.mark.slow
def test_resume_with_accumulation_window_cut_by_the_epoch_end(common, tmp_path):
    """4 batches a step over 6-batch epochs: each epoch's last step takes 2 batches. Resumed from the
    periodic checkpoint written there (step 2), and extended from a stop at max_steps=3 mid-epoch."""
    acc = [*common, "trainer.accumulate_grad_batches=4"]
    reference, run = tmp_path / "acc4_full", tmp_path / "acc4"
    run_train(reference, *acc, "trainer.max_steps=6", "callbacks.model_checkpoint.every_n_train_steps=2")
    resume(tmp_path / "acc4_from2", *acc, steps=6, ckpt=reference / "checkpoints" / "step0000002.ckpt")
    assert_same_as_full(reference, tmp_path / "acc4_from2", range(2, 6))
    run_train(run, *acc, "trainer.max_steps=3")
    resume(run, *acc, steps=6)
    assert_same_as_full(reference, run, range(6))


@pytest.mark.slow
def test_resume_resampled_stream(common, tmp_path):
    """An endless resampled stream cut into 4-batch epochs: stopped mid-epoch and at an epoch end."""
    stream = [*common, "data.resampled=true", "+data.epoch_steps=4"]
    reference, run = tmp_path / "stream_full", tmp_path / "stream"
    run_train(reference, *stream, "trainer.max_steps=12")
    run_train(run, *stream, "trainer.max_steps=6")
    for steps in (8, 12):
        resume(run, *stream, steps=steps)
    assert_same_as_full(reference, run, range(12))


def write_digit_folder(root: Path, n: int = 44, size: int = 40) -> Path:
    """`n` digit images of `size` px with a caption .txt each: an image folder (`data=folder`)."""
    from ldm.data.digits import _load, digit_caption, digit_image

    images, labels = _load()
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        digit_image(images[i], size).save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(digit_caption(int(labels[i])))
    return root


@pytest.mark.slow
def test_resume_image_folder(common, tmp_path):
    """An image folder with random crops and flips (5 batches an epoch): extended from a mid-epoch stop."""
    folder = write_digit_folder(tmp_path / "images")
    data = [*common, "data=folder", f"data.root={folder}", "data.resolution=32", "data.batch_size=8",
            "data.num_workers=0", "data.random_crop=true", "data.random_flip=true"]  # fmt: skip
    reference, run = tmp_path / "folder_full", tmp_path / "folder"
    run_train(reference, *data, "trainer.max_steps=12")
    run_train(run, *data, "trainer.max_steps=7")
    resume(run, *data, steps=12)
    assert_same_as_full(reference, run, range(12))


@pytest.mark.slow
def test_issue_16_extend_120_to_240_steps(tmp_path):
    """The report's commands (the digits experiment, batch 16: 102-batch epochs): 240 steps in one run,
    or 120 and then extended to 240 from last.ckpt, give bit-identical exported weights."""
    args = ["experiment=digits", "data.batch_size=16", "trainer.limit_val_batches=0", "logger=csv",
            "model.lr_scheduler.total_steps=240", "trainer.log_every_n_steps=1", f"paths.data_dir={tmp_path}",
            "trainer.enable_progress_bar=false", "callbacks.sample_grid=null"]  # fmt: skip
    a, b = tmp_path / "a", tmp_path / "b"
    run_train(a, *args, "trainer.max_steps=240")
    run_train(b, *args, "trainer.max_steps=120")
    resume(b, *args, steps=240)
    assert_same_as_full(a, b, range(240), buckets_every=100)  # (configs/model/ldm/digits.yaml)
