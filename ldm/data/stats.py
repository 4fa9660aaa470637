"""Counting skipped samples by reason, from DataLoader workers to the main process.

webdataset's `handler=warn_and_continue` prints and drops a sample but keeps no tally, so a run cannot say
how much of its data was unreadable, unsafe or too small. Here every stage that drops a sample names a
reason; a worker keeps a `SkipCounter`, attaches the counts since its previous batch to the next batch as
`batch["skipped"]` (a plain dict, which crosses the worker -> main process queue with the batch), and the
loader adds them to the DataModule's running totals (`WebDataModule.skip_counts`). A training system logs
them with `skip_log_dict(datamodule.skip_counts)`; under DDP each rank counts its own share, so log them
with `reduce_fx="sum"` and `sync_dist=True` for dataset-wide totals.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

# The reasons the pipeline uses, with what each means (the names are the keys of `batch["skipped"]`).
SKIP_REASONS: dict[str, str] = {
    "shard_error": "a shard could not be opened or read to the end (counted once per shard, not per sample)",
    "missing_image": "no .jpg/.jpeg/.png/.webp member for the key",
    "decode_error": "image bytes that PIL cannot open or fully decode (truncated, not an image)",
    "unsupported_mode": "an image mode with no sensible conversion to RGB",
    "too_large": "more pixels than the decompression-bomb limit (filters.max_pixels or PIL's)",
    "too_small": "short side below filters.min_size",
    "aspect_ratio": "width / height outside [filters.min_aspect_ratio, filters.max_aspect_ratio]",
    "missing_caption": "no .txt member and no 'caption' in the .json",
    "empty_caption": "a caption that is empty after stripping whitespace",
    "caption_length": "caption length (characters) outside the configured range",
    "bad_metadata": "a .json member that is not a JSON object",
    "unsafe": "metadata punsafe above filters.punsafe_max",
    "watermark": "metadata pwatermark above filters.pwatermark_max",
    "similarity": "metadata similarity below filters.similarity_min",
    "metadata": "another metadata threshold (filters.metadata_min / metadata_max) not met",
    "missing_label": "label_key is set but the sample has no readable label",
    "transform_error": "resizing / cropping failed for any other reason",
}


class SkipCounter:
    """Per-worker tally of skipped samples; `take()` returns the counts since the last `take()`.

    Lives inside one DataLoader worker (or the main process when num_workers=0), so it needs no locking.
    """

    def __init__(self) -> None:
        self.total: Counter[str] = Counter()
        self._pending: Counter[str] = Counter()

    def add(self, reason: str, n: int = 1) -> None:
        """Count `n` samples dropped for `reason`."""
        self.total[reason] += n
        self._pending[reason] += n

    def take(self) -> dict[str, int]:
        """Counts added since the previous call (what the next batch carries), then forget them."""
        out = dict(self._pending)
        self._pending.clear()
        return out

    def __bool__(self) -> bool:
        """True while there are counts not yet handed on with a batch."""
        return bool(self._pending)


def accumulate(total: Counter[str], delta: Mapping[str, int] | None) -> Counter[str]:
    """Add a batch's `skipped` dict to a running Counter (in place) and return it."""
    if delta:
        total.update({str(k): int(v) for k, v in delta.items()})
    return total


def skip_log_dict(counts: Mapping[str, int], prefix: str = "data/skipped/") -> dict[str, float]:
    """Counts as a flat dict for `LightningModule.log_dict`, plus their sum under `{prefix}total`."""
    out = {f"{prefix}{reason}": float(n) for reason, n in sorted(counts.items())}
    out[f"{prefix}total"] = float(sum(counts.values()))
    return out
