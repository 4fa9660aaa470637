"""Aspect-ratio bucketing: train on whole images of many shapes instead of square center crops.

NovelAI's scheme (NovelAI blog, "NovelAI Improvements on Stable Diffusion", 2022; kohya-ss/sd-scripts
`make_bucket_resolutions`): a fixed set of (height, width) resolutions, each side a multiple of 64 (the
VAE's factor 8 times the UNet's three downsamplings) with about resolution^2 pixels, so every batch costs
about the same. Each image goes to the bucket nearest its aspect ratio, is resized to cover it and
cropped (losing only a sliver), and batches are formed within one bucket so the tensors stack. In a
stream we cannot sort the dataset into buckets ahead of time, so `BucketBatcher` keeps one buffer per
bucket and emits a batch when a buffer fills.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any


def make_buckets(
    resolution: int, step: int = 64, min_side: int | None = None, max_side: int | None = None
) -> list[tuple[int, int]]:
    """(height, width) buckets with h * w <= resolution^2, sides multiples of `step` in [min_side,
    max_side] (defaults resolution / 2 and 2 x resolution), both orientations, sorted by aspect h / w.

    For each width the height is the largest multiple of `step` that keeps the area within budget, as in
    sd-scripts; the square bucket is always included.
    """
    if resolution < step:
        raise ValueError(f"resolution {resolution} is smaller than the bucket step {step}")
    min_side = min_side if min_side is not None else max(step, resolution // 2)
    max_side = max_side if max_side is not None else 2 * resolution
    min_side = math.ceil(min_side / step) * step
    max_side = (max_side // step) * step
    max_area = resolution * resolution
    side = (resolution // step) * step
    buckets = {(side, side)}
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, (max_area // width) // step * step)
        if height >= min_side:
            buckets.add((height, width))
            buckets.add((width, height))
    return sorted(buckets, key=lambda hw: (hw[0] / hw[1], hw[0]))


class AspectBuckets:
    """A bucket set and the nearest-aspect lookup: distance |log(w/h) - log(bw/bh)|, symmetric in
    portrait and landscape (sd-scripts compares aspect ratios linearly, which favours tall buckets)."""

    def __init__(self, buckets: Sequence[Sequence[int]]) -> None:
        if not buckets:
            raise ValueError("bucketing needs at least one bucket")
        self.buckets: list[tuple[int, int]] = [(int(h), int(w)) for h, w in buckets]
        self._log_aspects = [math.log(w / h) for h, w in self.buckets]

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], resolution: int) -> AspectBuckets:
        """From the `bucketing:` config block: explicit `buckets: [[h, w], ...]`, or `step`, `min_side`,
        `max_side` for `make_buckets(resolution, ...)`."""
        cfg = dict(cfg)
        unknown = sorted(set(cfg) - {"buckets", "step", "min_side", "max_side"})
        if unknown:
            raise ValueError(f"unknown bucketing option(s) {unknown}")
        if cfg.get("buckets"):
            return cls(cfg["buckets"])
        return cls(
            make_buckets(resolution, int(cfg.get("step", 64)), cfg.get("min_side"), cfg.get("max_side"))
        )

    def nearest(self, width: int, height: int) -> tuple[int, int]:
        """The (height, width) bucket whose aspect ratio is closest to width / height."""
        target = math.log(width / height)
        i = min(range(len(self.buckets)), key=lambda j: abs(self._log_aspects[j] - target))
        return self.buckets[i]

    def __len__(self) -> int:
        """Number of buckets."""
        return len(self.buckets)


class BucketBatcher:
    """Per-bucket buffers that turn a stream of (bucket, item) into batches whose items share a bucket.

    `add` returns a full batch as soon as one bucket's buffer reaches `batch_size`; `flush` hands out the
    partial buffers at the end of a finite stream. Memory is at most (batch_size - 1) items per bucket.
    """

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self._buffers: dict[tuple[int, int], list[Any]] = {}

    def add(self, bucket: tuple[int, int], item: Any) -> list[Any] | None:
        """Buffer `item` under `bucket`; return that bucket's batch when it is full, else None."""
        buf = self._buffers.setdefault(bucket, [])
        buf.append(item)
        if len(buf) >= self.batch_size:
            self._buffers[bucket] = []
            return buf
        return None

    def flush(self) -> Iterator[list[Any]]:
        """The remaining partial batches, one per non-empty bucket, emptying the buffers."""
        buffers, self._buffers = self._buffers, {}
        for buf in buffers.values():
            if buf:
                yield buf

    def __len__(self) -> int:
        """Items currently buffered."""
        return sum(len(b) for b in self._buffers.values())
