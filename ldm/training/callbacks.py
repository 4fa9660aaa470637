"""Training callbacks: sample grids from validation prompts, throughput (images/s, samples seen), and a
console summary of the samples the data pipeline skipped."""

from __future__ import annotations

import time
import warnings
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from ldm.data.stats import accumulate
from ldm.utils.images import image_grid


def log_image(trainer: pl.Trainer, key: str, image, step: int) -> None:
    """Send a PIL image to every logger that takes images (wandb `log_image`, tensorboard `add_image`)."""
    import numpy as np

    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):
            logger.log_image(key=key, images=[image], step=step)
        elif hasattr(getattr(logger, "experiment", None), "add_image"):
            logger.experiment.add_image(key, np.asarray(image), step, dataformats="HWC")


class EveryNSteps(pl.Callback):
    """Runs `run(trainer, pl_module, pipe, step)` every `every_n_steps` optimizer steps and after the last,
    once per step, on global rank 0, with a Pipeline of the EMA weights at the data's resolution (the model
    put back in its train/eval mode afterwards). Sample grids and the periodic FID evaluation share it."""

    every_n_steps: int = 0
    _last_step: int = -1

    def run(self, trainer: pl.Trainer, pl_module: Any, pipe: Any, step: int) -> None:
        raise NotImplementedError

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
                self.run(trainer, pl_module, pipe, step)
        finally:
            pl_module.train(was_training)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int
    ) -> None:
        if self.every_n_steps and trainer.global_step > 0 and trainer.global_step % self.every_n_steps == 0:
            self._run(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._run(trainer, pl_module)


class SampleGrid(EveryNSteps):
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

    def run(self, trainer: pl.Trainer, pl_module: Any, pipe: Any, step: int) -> None:
        # A class-conditional model has no prompts: it draws every class instead.
        classes = getattr(pipe.conditioner, "n_classes", None)
        cond = dict(labels=list(range(classes))) if classes else dict(prompt=self.prompts)
        images = pipe(**cond, **self.kwargs)
        grid = image_grid(images, cols=self.n_per_prompt if self.n_per_prompt > 1 else None)
        folder = Path(self.dirpath or Path(trainer.default_root_dir) / "samples")
        folder.mkdir(parents=True, exist_ok=True)
        grid.save(folder / f"step_{step:07d}.png")
        log_image(trainer, "samples", grid, step)


class Throughput(pl.Callback):
    """Logs train/images_per_sec (all ranks, between log steps) and train/samples_seen; with `flops`, also
    train/tflops_per_sec (the UNet's forward + backward FLOPs per batch, counted once on the meta device
    by Lightning's `measure_flops` at the first batch's shape, times batches per second) and train/mfu, that
    rate over the device's peak (`peak_flops`, or Lightning's table of CUDA devices for the trainer's
    precision; no MFU where neither gives one, e.g. on a CPU). The VAE encoder and the text encoder are
    frozen, so their FLOPs are not counted (model FLOPs utilization, Chowdhery et al. 2022, PaLM App. B)."""

    def __init__(self, batch_key: str = "image", flops: bool = True, peak_flops: float | None = None):
        self.batch_key = batch_key
        self.samples_seen = 0
        self._t0: float | None = None
        self._since = 0
        self._batches = 0
        self.flops = flops
        self.peak_flops = peak_flops
        self.flops_per_batch: int | None = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int
    ) -> None:
        # Batches from a latent cache (ldm.data.latent_cache) carry latents instead of images.
        key = self.batch_key if self.batch_key in batch else "latent_mean"
        n = len(batch[key]) * trainer.world_size
        self.samples_seen += n
        self._since += n
        self._batches += 1
        now = time.perf_counter()
        if self._t0 is None:  # the first batch includes start-up: start timing after it
            self._t0, self._since, self._batches = now, 0, 0
            if self.flops:
                try:
                    self.flops_per_batch = unet_flops_per_batch(pl_module, len(batch[self.batch_key]))
                except Exception as e:  # a metric must not stop training: say why it is missing
                    msg = f"callbacks.throughput: no FLOPs/MFU logged, counting failed: {e!r}"
                    warnings.warn(msg, stacklevel=2)
                    self.flops = False
                if self.peak_flops is None and self.flops_per_batch:
                    from lightning_fabric.utilities.throughput import get_available_flops

                    self.peak_flops = get_available_flops(pl_module.device, trainer.precision)
            return
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0 and now > self._t0:
            dt = now - self._t0
            pl_module.log("train/images_per_sec", self._since / dt, batch_size=1)
            pl_module.log("train/samples_seen", float(self.samples_seen), batch_size=1)
            if self.flops_per_batch:
                rate = self.flops_per_batch * self._batches / dt  # this rank's FLOP/s
                pl_module.log("train/tflops_per_sec", rate / 1e12, batch_size=1)
                if self.peak_flops:
                    pl_module.log("train/mfu", rate / self.peak_flops, batch_size=1)
            self._t0, self._since, self._batches = now, 0, 0

    def state_dict(self) -> dict:
        return {"samples_seen": self.samples_seen}

    def load_state_dict(self, state: dict) -> None:
        self.samples_seen = int(state.get("samples_seen", 0))


def unet_flops_per_batch(pl_module: Any, batch_size: int) -> int | None:
    """Forward + backward FLOPs of the module's UNet on one batch of latents, counted on the meta device
    (no memory, no time); None for a module without a rebuildable UNet (e.g. the autoencoder system)."""
    unet = getattr(pl_module, "unet", None)
    side = getattr(pl_module, "sample_size", None)
    if unet is None or not hasattr(unet, "config") or side is None:
        return None
    from lightning_fabric.utilities.throughput import measure_flops

    from ldm.nn.unet import UNetModel

    tokens = getattr(getattr(pl_module, "conditioner", None), "max_length", 1)
    with torch.device("meta"):
        meta = UNetModel(**unet.config)
        x = torch.empty(batch_size, unet.in_channels, side, side)
        t = torch.zeros(batch_size)
        ctx = None if unet.context_dim is None else torch.empty(batch_size, tokens, unet.context_dim)
        y = None if unet.num_classes is None else torch.zeros(batch_size, dtype=torch.long)
        return measure_flops(meta, lambda: meta(x, t, ctx, y), lambda out: out.sum())


def _sum_over_ranks(trainer: pl.Trainer, counts: Counter[str]) -> Counter[str]:
    """Each rank's skip counts added up (every rank must call this: it is a collective under DDP)."""
    dist = torch.distributed
    if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return Counter(counts)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, dict(counts))
    total: Counter[str] = Counter()
    for part in gathered:
        accumulate(total, part)
    return total


def format_skipped(counts: Mapping[str, int], what: str = "samples") -> str:
    """The total, then each reason, most frequent first: `3 samples (decode_error 2, too_small 1)`."""
    reasons = ", ".join(f"{r} {n}" for r, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n)
    total = sum(counts.values())
    return f"{total} {what}" + (f" ({reasons})" if reasons else "")


class SkippedSamples(pl.Callback):
    """Prints on rank zero, after each validation and at the end of training, one line with the samples
    the data pipeline skipped so far, by reason (the reasons of `ldm.data.stats.SKIP_REASONS`), e.g.
    `data: skipped 3 training samples (decode_error 2, too_small 1); validation skipped 0 samples`.
    Silent while nothing was skipped. The system still logs the counts as metrics; this puts them on the
    console.

    Counts come from the datamodule's running totals (`skip_counts`, `val_skip_counts`: complete, also
    counting what a loader skipped after its last batch or at scan time), else from the batches'
    `"skipped"` dicts; under DDP they are summed over ranks. They cover this process' run, not earlier
    runs a resumed run continues."""

    def __init__(self, key: str = "skipped"):
        self.key = key
        self.train_counts: Counter[str] = Counter()  # from batches, when the datamodule keeps no totals
        self.val_counts: Counter[str] = Counter()
        self._val_seen: Counter[str] = Counter()  # the datamodule's validation total at the last report

    def _datamodule_counts(self, trainer: pl.Trainer, attr: str) -> Counter[str] | None:
        counts = getattr(getattr(trainer, "datamodule", None), attr, None)
        return counts if isinstance(counts, Counter) else None

    def _train_total(self, trainer: pl.Trainer) -> Counter[str]:
        return self._datamodule_counts(trainer, "skip_counts") or self.train_counts

    def _val_total(self, trainer: pl.Trainer) -> Counter[str]:
        counts = self._datamodule_counts(trainer, "val_skip_counts")
        if counts is None:
            return Counter(self.val_counts)
        return Counter(counts) - self._val_seen  # this validation's share of the running total

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int
    ) -> None:
        if isinstance(batch, Mapping):
            accumulate(self.train_counts, batch.get(self.key))

    def _mark_validation_seen(self, trainer: pl.Trainer) -> None:
        # Not at validation start: Lightning has already fetched the first batch (and counted its skips)
        # by the time on_validation_epoch_start runs.
        self._val_seen = Counter(self._datamodule_counts(trainer, "val_skip_counts") or {})

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        self._mark_validation_seen(trainer)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.val_counts = Counter()

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int, dl_idx: int = 0
    ) -> None:
        if isinstance(batch, Mapping):
            accumulate(self.val_counts, batch.get(self.key))

    def _report(self, trainer: pl.Trainer, with_validation: bool) -> None:
        train = _sum_over_ranks(trainer, self._train_total(trainer))
        val = _sum_over_ranks(trainer, self._val_total(trainer)) if with_validation else Counter()
        if not trainer.is_global_zero or not (train.total() or val.total()):
            return
        line = f"data: skipped {format_skipped(train, 'training samples')}"
        if with_validation:
            line += f"; validation skipped {format_skipped(val)}"
        bar = trainer.progress_bar_callback
        if bar is not None and hasattr(bar, "print"):
            bar.print(line)  # above a live progress bar instead of through it
        else:
            print(line, flush=True)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if not trainer.sanity_checking:  # the sanity check's few batches are read again later
            self._report(trainer, with_validation=True)
        self._mark_validation_seen(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._report(trainer, with_validation=False)
