"""Non-finite guard: an optimizer step whose loss or gradient norm is NaN/inf is skipped, not taken.

One bad batch (a corrupt image, an fp overflow in attention) would otherwise write NaN into every weight,
the optimizer's moments and the EMA, and the run would go on "training" NaN for hours. Here such a step
changes nothing: the gradients are dropped (`p.grad = None`: torch optimizers leave a parameter without a
gradient untouched, moments and weight decay included), the systems skip their EMA update for the batch
(they read `pl_module.nonfinite_skipped`), the skip is counted (`train/skipped_nonfinite`, the total) and
training goes on. After `max_in_a_row` batches in a row with a skipped step the run is not going to
recover by itself: the guard writes `last.ckpt` (the weights are still those of the last good step) and
stops with a message naming the steps, exit status 1.

Lightning hooks used (Lightning 2.x `plugins/precision/precision.py`): `on_before_backward` receives each
micro-batch's loss (in automatic and manual optimization, `manual_backward` too); `on_before_optimizer_step`
runs after the closure, so after backward and, with AMP's fp16 GradScaler, after `scaler.unscale_` (the
norm is the true one) and before gradient clipping and `optimizer.step()`. With fp16 the GradScaler itself
skips steps with inf/NaN gradients and lowers its scale (torch.amp.GradScaler docs, "skips
optimizer.step()"): those overflows are its calibration, not divergence, and are neither counted nor
skipped twice here; a non-finite *loss* is ours to count in every precision. With bf16 / fp32 there is no
scaler and nothing else would skip the step. (Similar guards: fairseq's `--fp16` "overflow" skip,
Megatron-LM's `skipped_iter` with `check_for_nan_in_loss_and_grad`.)

Under DDP/FSDP the decision is reduced over ranks (`strategy.reduce_boolean_decision`), so every rank skips
the same steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info


class NonFiniteStop(SystemExit):
    """Raised to end a run after too many non-finite steps in a row: exit status 1, the message on stderr,
    no traceback (a SystemExit, as Lightning's own SIGTERM stop is)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def _grads(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


class NonFiniteGuard(pl.Callback):
    """Skip optimizer steps with a non-finite loss or gradient norm; stop after `max_in_a_row` batches in
    a row had one (0 or null: never stop). `dirpath`: where last.ckpt goes (default: the run's
    ModelCheckpoint folder, else <default_root_dir>/checkpoints)."""

    def __init__(self, max_in_a_row: int | None = 10, dirpath: str | None = None, verbose: bool = True):
        if max_in_a_row is not None and max_in_a_row < 0:
            raise ValueError(f"callbacks.nonfinite_guard.max_in_a_row={max_in_a_row}: must be >= 0 or null")
        self.max_in_a_row, self.dirpath, self.verbose = max_in_a_row, dirpath, verbose
        self.skipped_total = 0  # optimizer steps skipped over the whole run (kept in checkpoints)
        self.in_a_row = 0  # batches in a row with a skipped step
        self.first_bad_step: int | None = None  # global step of the first of them
        self.last_good_step: int | None = None
        self._loss_finite: torch.Tensor | bool = True  # since the last step (accumulation: all micro-batches)
        self._stepped = self._skipped = self._overflow = False  # in this batch

    # ------------------------------------------------------------------ per batch
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:  # fmt: skip
        self._stepped = self._skipped = self._overflow = False
        pl_module.nonfinite_skipped = False

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        # A tensor, not a bool: no device sync per micro-batch; the optimizer step reads it once.
        self._loss_finite = torch.isfinite(loss.detach()).all() & self._loss_finite

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:  # fmt: skip
        grads = _grads(optimizer)
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        flags = torch.stack([torch.as_tensor(self._loss_finite, device=norm.device), torch.isfinite(norm)])
        loss_ok, grads_ok = flags.tolist()  # the one device sync of the guard per optimizer step
        self._loss_finite = True
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        # fp16 + GradScaler: an inf gradient with a finite loss is an overflow the scaler skips itself.
        grads_bad = not grads_ok
        bad = not loss_ok or (grads_bad and scaler is None)
        bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        self._stepped = True
        if grads_bad and scaler is not None and not bad:  # the scaler's skip: the EMA's too, not counted
            self._overflow = True
            pl_module.nonfinite_skipped = True
        if not bad:
            return
        for group in optimizer.param_groups:  # optimizer.step() now leaves every parameter as it is
            for p in group["params"]:
                p.grad = None
        self._skipped = True
        pl_module.nonfinite_skipped = True
        self.skipped_total += 1
        if self.verbose:
            what = f"gradient norm {norm.item()}" if grads_bad else "loss"
            rank_zero_info(f"step {trainer.global_step}: non-finite {what}, optimizer step skipped")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        if not self._stepped:  # an accumulating micro-batch: nothing decided yet
            return
        pl_module.log("train/skipped_nonfinite", float(self.skipped_total), batch_size=1)
        # global_step has moved past this batch's steps: the step just attempted is global_step - 1.
        step = trainer.global_step - 1
        if self._overflow and not self._skipped:  # fp16 scale calibration: neither good nor bad
            return
        if not self._skipped:
            self.in_a_row, self.first_bad_step, self.last_good_step = 0, None, step
            return
        self.in_a_row += 1
        if self.first_bad_step is None:
            self.first_bad_step = step
        if self.max_in_a_row and self.in_a_row >= self.max_in_a_row:
            self._stop(trainer, step)

    def _stop(self, trainer: pl.Trainer, step: int) -> None:
        path = self.path(trainer)
        trainer.save_checkpoint(path)  # weights and optimizer state unchanged since the last good step
        good = "none" if self.last_good_step is None else f"step {self.last_good_step}"
        run = Path(trainer.default_root_dir).resolve()
        message = (
            f"non-finite loss or gradients at steps {self.first_bad_step}..{step} ({self.in_a_row} "
            f"optimizer steps in a row skipped, callbacks.nonfinite_guard.max_in_a_row={self.max_in_a_row}): "
            f"stopping.\n"
            f"saved {path} with the weights of the last good step ({good}).\n"
            f"lower model.optimizer.lr, set trainer.gradient_clip_val, or use trainer.precision=32-true / "
            f"bf16-mixed; then resume: python train.py <same arguments> hydra.run.dir={run} ckpt_path={path}"
        )
        raise NonFiniteStop(message)

    def path(self, trainer: pl.Trainer) -> Path:
        folder = self.dirpath or getattr(trainer.checkpoint_callback, "dirpath", None)
        return Path(folder or Path(trainer.default_root_dir) / "checkpoints") / "last.ckpt"

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"skipped_total": self.skipped_total}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_total = int(state_dict.get("skipped_total", 0))
