"""Progress a person can read: one bar over the whole run (step / max_steps) in a terminal, and plain lines
(step, loss, images/s, ETA) every N seconds when the output goes to a file or a pipe (SLURM logs, `| tee`)."""

from __future__ import annotations

import sys
import time
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar

# Logged by the systems without prog_bar=True (see StepProgressBar.get_metrics) and shown on the bar.
BAR_METRICS = ("train/loss",)


def _duration(seconds: float) -> str:
    """12s, 4m05s, 2h03m."""
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar counted in optimizer steps over `max_steps` for the whole run, instead of one bar
    per epoch (our runs are step-based with `max_epochs: -1`: an epoch of the digits is 25 steps, so the
    stock bar restarted every 25 steps and never showed how far the run was).

    When stdout is not a terminal (`plain=None` decides by `sys.stdout.isatty()`), tqdm's carriage-return
    redraws would pile up in a log file, so the bars are switched off and a line such as
    `step 120/1500 (8%) | train/loss 0.1234 | 85 images/s | 1m24s elapsed | ETA 16m10s` is printed on the
    first step, then every `every_n_seconds`, and on the last step. The tqdm subclass is kept rather than
    RichProgressBar: tqdm is already a dependency of Lightning and of ours, and rich redraws the same way.
    """

    def __init__(
        self,
        refresh_rate: int = 1,
        process_position: int = 0,
        every_n_seconds: float = 30.0,
        plain: bool | None = None,
        postfix_every_n_seconds: float = 1.0,
    ):
        super().__init__(refresh_rate=refresh_rate, process_position=process_position)
        self.every_n_seconds = every_n_seconds
        self.postfix_every_n_seconds = postfix_every_n_seconds
        self.plain = plain
        self._plain_now = False
        self._t_start = self._t_last = self._t_postfix = 0.0
        self._step_last = 0
        self._samples = 0

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, int | str | float]:
        """Lightning's bar metrics plus the training loss. The systems log `train/loss` without
        `prog_bar=True`, because Lightning converts every progress-bar metric to a Python number after each
        batch (`_LoggerConnector.on_batch_end`), a host-device sync per step on a GPU; here it is read only
        when the bar or a plain line is drawn."""
        metrics = super().get_metrics(trainer, pl_module)
        for key in BAR_METRICS:
            value = trainer.callback_metrics.get(key)
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                metrics[key] = value.item()
        return metrics

    def _total_steps(self, trainer: pl.Trainer) -> int | None:
        return trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None

    # --- the terminal bar ---------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._plain_now = (not sys.stdout.isatty()) if self.plain is None else self.plain
        if self._plain_now:
            self.disable()  # every tqdm bar (sanity check, validation too); the lines below replace them

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._t_start = self._t_last = time.perf_counter()
        self._step_last, self._samples = trainer.global_step, 0

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        total = self._total_steps(trainer)
        if total is None:  # an epoch-based run: Lightning's per-epoch bar is the right one
            return super().on_train_epoch_start(trainer, *args)
        bar = self.train_progress_bar
        if bar.total != total:  # first epoch of this run (a resumed run starts at its step)
            bar.reset(total=total)
            bar.initial = bar.n = trainer.global_step
            bar.set_description("train")
            bar.refresh()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._total_steps(trainer) is None:
            return super().on_train_epoch_end(trainer, pl_module)
        # One bar for the whole run: an epoch's end (every step of a small DreamBooth set) redraws nothing
        # and reads nothing back from the device.

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        total = self._total_steps(trainer)
        if total is None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        elif self.is_enabled and self._should_update(trainer.global_step, total):
            self.train_progress_bar.n = trainer.global_step
            now = time.perf_counter()
            # The postfix reads the logged loss back from the device (a sync on a GPU): not every step, at
            # most every `postfix_every_n_seconds` (and on the last step).
            if now - self._t_postfix >= self.postfix_every_n_seconds or trainer.global_step >= total:
                self._t_postfix = now
                self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            self.train_progress_bar.refresh()
        if self._plain_now and trainer.is_global_zero:
            self._samples += self._batch_size(batch) * trainer.world_size
            self._maybe_print_line(trainer, pl_module, total)

    # --- plain lines ---------------------------------------------------------------------------------
    @staticmethod
    def _batch_size(batch: Any) -> int:
        """Leading size of the batch's first tensor (dicts and lists searched in order), 0 if none.
        (Lightning's `extract_batch_size` does the same but warns on every dict with several tensors.)"""
        if isinstance(batch, torch.Tensor):
            return int(batch.shape[0]) if batch.ndim else 0
        if isinstance(batch, dict):
            batch = list(batch.values())
        items = batch if isinstance(batch, (list, tuple)) else ()
        for item in items:
            if n := StepProgressBar._batch_size(item):
                return n
        return 0

    def _maybe_print_line(self, trainer: pl.Trainer, pl_module: Any, total: int | None) -> None:
        now, step = time.perf_counter(), trainer.global_step
        first = step == self._step_last + 1 and self._t_last == self._t_start
        last = total is not None and step >= total
        if not (first or last or now - self._t_last >= self.every_n_seconds) or step == self._step_last:
            return
        dt, steps = now - self._t_last, step - self._step_last
        parts = [f"step {step}/{total} ({100 * step / total:.0f}%)" if total else f"step {step}"]
        for key, value in self.get_metrics(trainer, pl_module).items():
            if key != "v_num":
                parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
        if not first and dt > 0:  # the first step's time is mostly start-up: no rate from it
            if self._samples:
                parts.append(f"{self._samples / dt:.0f} images/s")
            if total and not last:
                parts.append(f"ETA {_duration((total - step) * dt / steps)}")  # at the latest rate
        parts.append(f"{_duration(now - self._t_start)} elapsed")
        print(" | ".join(parts), flush=True)
        self._t_last, self._step_last, self._samples = now, step, 0
