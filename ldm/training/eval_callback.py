"""FID, KID and CLIP score of the EMA model every N training steps, logged through Lightning's loggers
(wandb, CSV, TensorBoard) as eval/fid, eval/kid_mean, eval/kid_std, eval/clip_score.

A small evaluation (n images, a fixed seed) tracks progress; it is not the number to publish (FID is
biased at small n: report `python -m ldm.eval` with thousands of images). Add it with
`callbacks=[ldm,eval_fid]` (configs/callbacks/eval_fid.yaml); the reference statistics are computed once
and cached (ldm.eval.reference).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from torch import nn

from ldm.training.callbacks import EveryNSteps


class EvalCallback(EveryNSteps):
    """Every `every_n_steps` optimizer steps (and after the last), sample `n` images of `prompts` (a list or
    a text file; image i: prompt i mod len, seed seed + i) with the EMA weights on global rank 0, score them
    against `ref` in `extractor`'s feature space, and log the numbers at that step."""

    def __init__(
        self, ref: str, prompts: list[str] | str, extractor: nn.Module, every_n_steps: int = 1000,
        n: int = 64, steps: int = 20, sampler: str = "dpmpp_2m", guidance_scale: float = 5.0, seed: int = 0,
        batch_size: int = 8, image_size: int | None = None, clip_model: str | None = None,
        cache_dir: str = "~/.cache/ldm/ref_stats", ref_n: int | None = None, kid_subsets: int = 100,
        kid_subset_size: int = 1000,
    ):  # fmt: skip
        if int(n) < 2:
            raise ValueError(f"callbacks.eval_fid.n={n}: FID needs at least 2 images")
        if isinstance(prompts, str):
            path = Path(prompts)
            if not path.is_file():
                raise FileNotFoundError(f"callbacks.eval_fid.prompts: {prompts} is not a list or a text file")
            prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError("callbacks.eval_fid.prompts is empty")
        self.ref, self.prompts, self.extractor = str(ref), list(prompts), extractor
        self.every_n_steps = every_n_steps
        self.n, self.batch_size, self.image_size, self.seed = int(n), int(batch_size), image_size, int(seed)
        self.sampling = dict(steps=steps, sampler=sampler, guidance_scale=guidance_scale)
        self.clip_model, self.cache_dir, self.ref_n = clip_model, cache_dir, ref_n
        self.kid = dict(kid_subsets=kid_subsets, kid_subset_size=kid_subset_size)
        self._clip = None

    def run(self, trainer: pl.Trainer, pl_module: Any, pipe: Any, step: int) -> None:
        from ldm.eval.metrics import ClipScorer
        from ldm.eval.reference import reference_stats
        from ldm.eval.score import evaluate_pipeline

        if getattr(pipe, "is_class_conditional", False):
            raise ValueError("callbacks.eval_fid samples prompts; this model is class-conditional")
        size = self.image_size or pipe.sample_size * pipe.vae.downsampling_factor
        self.extractor.to(pl_module.device)
        if self.clip_model and self._clip is None:
            self._clip = ClipScorer(self.clip_model, pl_module.device)
        ref, _ = reference_stats(
            self.ref, self.extractor, image_size=size, n=self.ref_n, cache_dir=self.cache_dir
        )  # cached after the first time
        metrics = evaluate_pipeline(
            pipe, self.prompts, ref, self.extractor, n=self.n, seed=self.seed,
            batch_size=self.batch_size, clip=self._clip, image_size=size, **self.sampling, **self.kid,
        )  # fmt: skip
        keys = ("fid", "kid_mean", "kid_std", "clip_score")
        values = {f"eval/{k}": float(metrics[k]) for k in keys if metrics[k] is not None}
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)
