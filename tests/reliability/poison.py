"""Test callbacks that inject a NaN at chosen steps: into the batch (a non-finite loss) or into one weight's
gradient after backward (a finite loss, a non-finite gradient norm). Used in-process and by train.py runs
(`+callbacks.poison._target_=tests.reliability.poison.PoisonBatch +callbacks.poison.steps=[2]`)."""

from __future__ import annotations

import pytorch_lightning as pl


def _hit(trainer: pl.Trainer, steps, from_step) -> bool:
    step = trainer.global_step
    return step in (steps or ()) or (from_step is not None and step >= from_step)


class PoisonBatch(pl.Callback):
    """NaN images in the batches that step at global_step in `steps` (or >= `from_step`)."""

    def __init__(self, steps: list[int] | None = None, from_step: int | None = None):
        self.steps, self.from_step = list(steps or ()), from_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if _hit(trainer, self.steps, self.from_step):
            batch["image"].fill_(float("nan"))


class PoisonGrad(pl.Callback):
    """After backward at global_step in `steps`: one gradient element of the first trainable weight is NaN."""

    def __init__(self, steps: list[int] | None = None, from_step: int | None = None):
        self.steps, self.from_step = list(steps or ()), from_step

    def on_after_backward(self, trainer, pl_module):
        if _hit(trainer, self.steps, self.from_step):
            p = next(p for p in pl_module.parameters() if p.grad is not None)
            p.grad.view(-1)[0] = float("nan")
