"""Score batches of images (features + CLIP score sums), then the whole set (FID, KID, CLIP score).

Batches are kept apart, keyed by the index of their first image, so that results gathered from several
processes are put back in image order and give the numbers of one process exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import nn

from ldm.eval.metrics import ClipScorer, FeatureStats, extract, fid, kid, to_uint8


@dataclass
class BatchScore:
    start: int
    features: np.ndarray  # float64 n x D
    clip_sum: float | None
    clip_n: int
    records: list[dict] = field(default_factory=list)


def score_batch(
    start: int, images: list[Image.Image], captions: list[str] | None, extractor: nn.Module,
    clip: ClipScorer | None, image_size: int | None, feature_batch_size: int = 50,
    records: list[dict] | None = None,
) -> BatchScore:  # fmt: skip
    """Features (and CLIP score sum) of one batch; images enter as uint8 at `image_size` (see `to_uint8`)."""
    pixels = to_uint8(images, image_size)
    features = extract(extractor, pixels, feature_batch_size).numpy()
    clip_sum, clip_n = (None, 0) if clip is None or captions is None else clip.batch(pixels, captions)
    return BatchScore(start, features, clip_sum, clip_n, list(records or []))


def summarize(
    batches: list[BatchScore], ref: FeatureStats, *, kid_subsets: int = 100, kid_subset_size: int = 1000,
    seed: int = 0,
) -> dict:  # fmt: skip
    """FID, KID (mean, std) and CLIP score of all batches, in image order."""
    batches = sorted(batches, key=lambda b: b.start)
    gen = FeatureStats.from_features(np.concatenate([b.features for b in batches]))
    out = dict(fid=fid(ref, gen), kid_mean=None, kid_std=None, kid_subset_size=None, kid_subsets=kid_subsets)
    k = kid(ref, gen, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
    if k is not None:
        out.update(kid_mean=k[0], kid_std=k[1], kid_subset_size=k[2])
    clip_n = sum(b.clip_n for b in batches)
    clip_sum = sum(b.clip_sum for b in batches if b.clip_sum is not None)
    out["clip_score"] = max(clip_sum / clip_n, 0.0) if clip_n else None  # as torchmetrics' CLIPScore.compute
    out["n_images"] = gen.n
    return out


@torch.no_grad()
def evaluate_pipeline(
    pipe, prompts: list[str], ref: FeatureStats, extractor: nn.Module, *, n: int, steps: int, sampler: str,
    guidance_scale: float, seed: int = 0, batch_size: int = 4, clip: ClipScorer | None = None,
    image_size: int | None = None, kid_subsets: int = 100, kid_subset_size: int = 1000, **pipe_kwargs,
) -> dict:  # fmt: skip
    """Generate n images in this process (no files written) and score them: the training callback's path."""
    jobs = [prompts[i % len(prompts)] for i in range(n)]
    batches = []
    for start in range(0, n, batch_size):
        batch = jobs[start : start + batch_size]
        settings = dict(steps=steps, sampler=sampler, guidance_scale=guidance_scale, seed=seed + start)
        images = pipe(prompt=batch, **settings, **pipe_kwargs)
        batches.append(score_batch(start, images, batch, extractor, clip, image_size))
    return summarize(batches, ref, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, seed=seed)
