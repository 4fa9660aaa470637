"""Training callbacks: sample grids from validation prompts, and throughput (images/s, samples seen)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from ldm.utils.images import image_grid


def log_image(trainer: pl.Trainer, key: str, image, step: int) -> None:
    """Send a PIL image to every logger that takes images (wandb `log_image`, tensorboard `add_image`)."""
    import numpy as np

    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):
            logger.log_image(key=key, images=[image], step=step)
        elif hasattr(getattr(logger, "experiment", None), "add_image"):
            logger.experiment.add_image(key, np.asarray(image), step, dataformats="HWC")


class SampleGrid(pl.Callback):
    """Every `every_n_steps` optimizer steps (and after the last), sample the prompts with the EMA weights
    and a fixed seed, save `<run>/samples/step_XXXXXXX.png` and log the grid: a run's progress by eye."""

    def __init__(
        self,
        prompts: list[str],
        every_n_steps: int = 500,
        steps: int = 20,
        sampler: str = "dpmpp_2m",
        guidance_scale: float = 5.0,
        seed: int = 0,
        n_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        dirpath: str | None = None,
    ):
        self.prompts, self.every_n_steps = list(prompts), every_n_steps
        self.kwargs = dict(steps=steps, sampler=sampler, guidance_scale=guidance_scale, seed=seed,
                           num_images_per_prompt=n_per_prompt, height=height, width=width)  # fmt: skip
        self.n_per_prompt = n_per_prompt
        self.dirpath = dirpath
        self._last_step = -1

    def _run(self, trainer: pl.Trainer, pl_module: Any) -> None:
        step = trainer.global_step
        if step == self._last_step or not trainer.is_global_zero:
            return
        self._last_step = step
        was_training = pl_module.training
        pl_module.eval()
        try:
            pipe = pl_module.to_pipeline(use_ema=True)
            if hasattr(trainer, "datamodule") and hasattr(trainer.datamodule, "resolution"):
                pipe.sample_size = trainer.datamodule.resolution // pipe.vae.downsampling_factor
            with torch.no_grad():
                images = pipe(self.prompts, **self.kwargs)
        finally:
            pl_module.train(was_training)
        grid = image_grid(images, cols=self.n_per_prompt if self.n_per_prompt > 1 else None)
        folder = Path(self.dirpath or Path(trainer.default_root_dir) / "samples")
        folder.mkdir(parents=True, exist_ok=True)
        grid.save(folder / f"step_{step:07d}.png")
        log_image(trainer, "samples", grid, step)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int
    ) -> None:
        if self.every_n_steps and trainer.global_step > 0 and trainer.global_step % self.every_n_steps == 0:
            self._run(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._run(trainer, pl_module)


class Throughput(pl.Callback):
    """Logs train/images_per_sec (all ranks, between log steps) and train/samples_seen."""

    def __init__(self, batch_key: str = "image"):
        self.batch_key = batch_key
        self.samples_seen = 0
        self._t0: float | None = None
        self._since = 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int
    ) -> None:
        n = len(batch[self.batch_key]) * trainer.world_size
        self.samples_seen += n
        self._since += n
        now = time.perf_counter()
        if self._t0 is None:  # the first batch includes start-up: start timing after it
            self._t0, self._since = now, 0
            return
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0 and now > self._t0:
            pl_module.log("train/images_per_sec", self._since / (now - self._t0), batch_size=1)
            pl_module.log("train/samples_seen", float(self.samples_seen), batch_size=1)
            self._t0, self._since = now, 0

    def state_dict(self) -> dict:
        return {"samples_seen": self.samples_seen}

    def load_state_dict(self, state: dict) -> None:
        self.samples_seen = int(state.get("samples_seen", 0))
