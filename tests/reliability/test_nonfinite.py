"""Non-finite guard (ldm/training/nonfinite.py) in real Trainers and a real train.py run: a NaN injected at
a chosen step skips that optimizer step (weights, optimizer moments and EMA stay as they were), is counted
in train/skipped_nonfinite, and training goes on; too many in a row stop the run with last.ckpt holding
the last good weights and a message naming the steps."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch

from ldm.training.nonfinite import NonFiniteGuard, NonFiniteStop
from tests.reliability.poison import PoisonBatch, PoisonGrad
from tests.test_autoencoder_system import batches, make_system
from tests.test_diffusion_system import caption_batches, text_system
from tests.tiny import REPO
from tests.train_utils import FAST, tiny_autoencoder_file


class Snapshots(pl.Callback):
    """Weights, EMA shadow and optimizer state of `module_name` after every batch."""

    def __init__(self, module_name: str):
        self.module_name, self.after = module_name, []

    def _snap(self, trainer, pl_module):
        module = getattr(pl_module, self.module_name)
        opt = trainer.optimizers[0].state
        return {
            "weights": {k: v.detach().clone() for k, v in module.named_parameters()},
            "ema": {k: v.clone() for k, v in pl_module.ema.shadow.items()},
            "ema_updates": pl_module.ema.num_updates,
            "opt": {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.items()},
        }

    def on_train_start(self, trainer, pl_module):
        self.before = self._snap(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.after.append(self._snap(trainer, pl_module))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def fit(system, loader, callbacks, **kw) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, **kw,
    )  # fmt: skip
    trainer.fit(system, loader)
    return trainer


@pytest.mark.parametrize("poison", [PoisonBatch, PoisonGrad], ids=["nan_loss", "nan_grad"])
def test_diffusion_step_with_nan_is_skipped_and_training_goes_on(poison):
    system = text_system(
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-2), ema={"decay": 0.5, "warmup": None}
    )
    snaps = Snapshots("unet")
    trainer = fit(system, caption_batches(4), [poison(steps=[2]), NonFiniteGuard(max_in_a_row=3), snaps])
    s = snaps.after
    assert trainer.global_step == 4  # the skipped step still counts as a step (as the LR schedule does)
    assert not same(s[1]["weights"], s[0]["weights"])  # a normal step moves the weights
    assert same(s[2]["weights"], s[1]["weights"]) and same(s[2]["ema"], s[1]["ema"])  # step 2 skipped
    assert s[2]["ema_updates"] == s[1]["ema_updates"] == 2 and s[3]["ema_updates"] == 3
    assert all(same(s[2]["opt"][p], s[1]["opt"][p]) for p in s[1]["opt"])  # Adam moments and step count
    assert not same(s[3]["weights"], s[2]["weights"])  # ... and training went on
    assert all(torch.isfinite(w).all() for w in s[3]["weights"].values())
    assert all(torch.isfinite(w).all() for w in system.ema.shadow.values())
    assert trainer.callback_metrics["train/skipped_nonfinite"] == 1


@pytest.mark.parametrize(
    "poison, precision, counted",
    [(PoisonGrad, "bf16-mixed", 1), (PoisonGrad, "16-mixed", 0), (PoisonBatch, "16-mixed", 1)],
    ids=["bf16_nan_grad", "fp16_overflow", "fp16_nan_loss"],
)
def test_mixed_precision_skips_once(poison, precision, counted):
    """bf16 has no GradScaler: the guard skips. fp16: the GradScaler skips inf/NaN gradients itself and
    halves its scale (torch.amp.GradScaler); that overflow is not counted again, but the EMA skips it too.
    A NaN loss is counted in every precision. (fp16 AMP on the CPU: Lightning's MixedPrecision plugin with
    a CPU GradScaler, as `precision="16-mixed"` builds on CUDA.)"""
    from pytorch_lightning.plugins.precision import MixedPrecision

    system = text_system(
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-2), ema={"decay": 0.5, "warmup": None}
    )
    snaps, guard = Snapshots("unet"), NonFiniteGuard(max_in_a_row=3)
    scaler = torch.amp.GradScaler("cpu") if precision == "16-mixed" else None
    kw = (
        {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=scaler)]}
        if scaler
        else {"precision": precision}
    )
    trainer = fit(system, caption_batches(4), [poison(steps=[2]), guard, snaps], **kw)
    s = snaps.after
    assert same(s[2]["weights"], s[1]["weights"]) and same(s[2]["ema"], s[1]["ema"])
    assert [x["ema_updates"] for x in s] == [1, 2, 2, 3]
    assert not same(s[3]["weights"], s[2]["weights"])
    assert guard.skipped_total == counted == trainer.callback_metrics["train/skipped_nonfinite"]
    if scaler is not None:
        assert scaler.get_scale() == 2.0**15  # 2**16 halved once: the scaler saw the non-finite step


def test_autoencoder_step_with_nan_is_skipped_and_training_goes_on():
    """Manual optimization, two optimizers: the poisoned autoencoder step and the EMA update are skipped."""
    system = make_system(ema_decay=0.5, disc_start=100)  # autoencoder steps only: one per batch
    snaps = Snapshots("autoencoder")
    trainer = fit(system, batches(n=8, batch_size=2), [PoisonBatch(steps=[1]), NonFiniteGuard(), snaps])
    s = snaps.after
    assert same(s[1]["weights"], s[0]["weights"]) and same(s[1]["ema"], s[0]["ema"])
    assert s[1]["ema_updates"] == s[0]["ema_updates"] == 1
    assert not same(s[2]["weights"], s[1]["weights"])
    assert all(torch.isfinite(w).all() for w in s[-1]["weights"].values())
    assert trainer.callback_metrics["train/skipped_nonfinite"] == 1


def test_in_a_row_stops_in_process(tmp_path):
    system = text_system()
    with pytest.raises(NonFiniteStop, match=r"steps 1\.\.2"):
        fit(system, caption_batches(5), [PoisonGrad(from_step=1), NonFiniteGuard(max_in_a_row=2)],
            default_root_dir=tmp_path)  # fmt: skip
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_train_py_stops_after_k_in_a_row_with_the_last_good_weights(tmp_path):
    """A real run: steps 0-1 good (step0000002.ckpt written), NaN images from step 2 on; max_in_a_row=3
    stops it after step 4 with exit status 1, a message naming the steps, and last.ckpt holding the
    weights and EMA of step0000002.ckpt."""
    run = tmp_path / "run"
    ae = tiny_autoencoder_file(tmp_path / "ae.safetensors")
    cmd = [
        sys.executable, str(REPO / "train.py"), "experiment=digits", f"model.autoencoder.path={ae}",
        f"paths.data_dir={tmp_path / 'data'}", *FAST, "trainer.max_steps=8",
        "callbacks.model_checkpoint.every_n_train_steps=2", "callbacks.nonfinite_guard.max_in_a_row=3",
        "+callbacks.poison._target_=tests.reliability.poison.PoisonBatch", "+callbacks.poison.from_step=2",
        f"hydra.run.dir={run}",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "non-finite loss or gradients at steps 2..4" in proc.stderr
    assert "Traceback" not in proc.stderr
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    good = torch.load(run / "checkpoints" / "step0000002.ckpt", weights_only=False)
    assert last["global_step"] == 5 and good["global_step"] == 2
    assert same(last["state_dict"], good["state_dict"]) and same(last["ema"]["shadow"], good["ema"]["shadow"])
    assert last["callbacks"]["NonFiniteGuard"]["skipped_total"] == 3
    assert not (run / "export").exists()
