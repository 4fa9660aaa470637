"""Config-driven sample filters: image size and aspect, caption, and LAION metadata thresholds.

Every check returns the reason a sample should be dropped (a key of `stats.SKIP_REASONS`) or None, so the
pipeline can count drops by reason. `SampleProcessor` runs them on one raw webdataset sample, cheapest
first: caption and metadata before the image is decoded, and size / aspect ratio from the image header
before its pixels are (PIL reads the header on `Image.open` and the pixels only on `load()`), then
decodes and transforms what passed.

Metadata fields follow img2dataset's `.json` and the LAION-5B columns (`similarity`: CLIP image-text
cosine; `punsafe`: NSFW probability; `pwatermark`: watermark probability). A threshold on a field that a
sample does not carry lets the sample through, since subsets of LAION differ in which columns they have.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from PIL import Image

from ldm.data.bucketing import AspectBuckets
from ldm.data.transforms import (
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    ImageTransform,
    UnsupportedModeError,
    cover_size,
    load_rgb,
    open_image,
    oriented_size,
)

log = logging.getLogger(__name__)


@dataclass
class FilterConfig:
    """Thresholds from the `filters:` block of configs/data/webdataset.yaml (None or 0 = no limit)."""

    min_size: int = 0  # short side of the image as stored in the shard, pixels
    max_pixels: int | None = None  # decompression-bomb limit; None = PIL.Image.MAX_IMAGE_PIXELS
    min_aspect_ratio: float | None = None  # width / height
    max_aspect_ratio: float | None = None
    min_caption_length: int = 1  # characters, after stripping whitespace
    max_caption_length: int | None = None
    punsafe_max: float | None = None
    pwatermark_max: float | None = None
    similarity_min: float | None = None
    metadata_min: dict[str, float] = field(default_factory=dict)  # any other numeric .json field
    metadata_max: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any] | FilterConfig | None) -> FilterConfig:
        """Build from a (Hydra) mapping; unknown keys are an error, so a typo cannot silently disable a
        filter."""
        if isinstance(cfg, FilterConfig):
            return cfg
        cfg = dict(cfg or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"unknown filter option(s) {unknown}; known: {sorted(known)}")
        for key in ("metadata_min", "metadata_max"):
            cfg[key] = {str(k): float(v) for k, v in dict(cfg.get(key) or {}).items()}
        return cls(**cfg)


def read_caption(sample: Mapping[str, Any], metadata: Mapping[str, Any]) -> str | None:
    """The caption of a raw webdataset sample: its `.txt` member, else the `.json` "caption" (both are
    written by img2dataset); None when there is neither."""
    raw = sample.get("txt")
    if raw is None:
        raw = metadata.get("caption")
    if raw is None:
        return None
    if isinstance(raw, bytes):
        # Scraped captions contain stray bytes; replacing them keeps the sample (a caption is not
        # worth dropping an image for over one character).
        raw = raw.decode("utf-8", errors="replace")
    return str(raw).strip()


def read_metadata(sample: Mapping[str, Any]) -> dict[str, Any] | None:
    """The parsed `.json` member ({} when there is none); None when it exists but is not a JSON object."""
    raw = sample.get("json")
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except (ValueError, TypeError):
        return None
    return meta if isinstance(meta, dict) else None


def check_caption(caption: str | None, cfg: FilterConfig) -> str | None:
    """Reason to drop a sample for its caption, or None."""
    if caption is None:
        return "missing_caption"
    if not caption:
        return "empty_caption"
    if len(caption) < cfg.min_caption_length:
        return "caption_length"
    if cfg.max_caption_length is not None and len(caption) > cfg.max_caption_length:
        return "caption_length"
    return None


def _number(meta: Mapping[str, Any], key: str) -> float | None:
    """A numeric metadata field, or None when absent / null / not a number (img2dataset writes null for
    columns it did not have)."""
    value = meta.get(key)
    if isinstance(value, bool) or value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def check_metadata(meta: Mapping[str, Any], cfg: FilterConfig) -> str | None:
    """Reason to drop a sample for its LAION metadata, or None; missing fields pass (see module doc)."""
    named = (
        ("punsafe", cfg.punsafe_max, "max", "unsafe"),
        ("pwatermark", cfg.pwatermark_max, "max", "watermark"),
        ("similarity", cfg.similarity_min, "min", "similarity"),
    )
    generic = [(k, v, "min", "metadata") for k, v in cfg.metadata_min.items()]
    generic += [(k, v, "max", "metadata") for k, v in cfg.metadata_max.items()]
    for key, limit, kind, reason in (*named, *generic):
        if limit is None:
            continue
        value = _number(meta, key)
        if value is None:
            continue
        if (kind == "max" and value > limit) or (kind == "min" and value < limit):
            return reason
    return None


def max_pixels(cfg: FilterConfig) -> int:
    """The pixel-count limit in force: the configured one, else PIL's own `MAX_IMAGE_PIXELS` (read at call
    time, so a user who raises PIL's limit raises ours)."""
    if cfg.max_pixels is not None:
        return int(cfg.max_pixels)
    from PIL import Image

    return int(Image.MAX_IMAGE_PIXELS or 2**62)


def check_image_size(width: int, height: int, cfg: FilterConfig) -> str | None:
    """Reason to drop an image for its stored size (read from the header before decoding), or None."""
    if width * height > max_pixels(cfg):
        return "too_large"
    if min(width, height) < cfg.min_size or min(width, height) < 1:
        return "too_small"
    aspect = width / height
    if cfg.min_aspect_ratio is not None and aspect < cfg.min_aspect_ratio:
        return "aspect_ratio"
    if cfg.max_aspect_ratio is not None and aspect > cfg.max_aspect_ratio:
        return "aspect_ratio"
    return None


def read_label(raw: Any) -> int | None:
    """An integer class label from a member such as `{key}.cls` (webdataset's convention), else None."""
    if raw is None:
        return None
    try:
        return int(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    except (ValueError, UnicodeDecodeError, TypeError):
        return None


def original_size(meta: Mapping[str, Any], height: int, width: int) -> tuple[int, int]:
    """(height, width) before any resize: img2dataset's original_height / original_width when present
    (it may have shrunk the image at download time), else the size of the stored image."""
    oh, ow = _number(meta, "original_height"), _number(meta, "original_width")
    if oh is not None and ow is not None and oh >= 1 and ow >= 1:
        return int(oh), int(ow)
    return height, width


class SampleProcessor:
    """One raw webdataset sample (member name -> bytes) -> a training sample, or the reason to drop it.

    The output holds "image" (3, h, w) in [-1, 1], "caption", "original_size" (h, w), "crop_coords"
    (top, left), "key", "bucket" (h, w) and, with `label_key`, "label".
    """

    def __init__(
        self,
        filters: FilterConfig,
        transform: ImageTransform,
        buckets: AspectBuckets | None = None,
        label_key: str | None = None,
    ) -> None:
        self.filters = filters
        self.transform = transform
        self.buckets = buckets
        self.label_key = label_key

    def __call__(self, raw: Mapping[str, Any], rng: random.Random) -> dict[str, Any] | str:
        """Process `raw`; `rng` drives the random crop / flip. Returns a reason string when dropped."""
        meta = read_metadata(raw)
        if meta is None:
            return "bad_metadata"
        caption = read_caption(raw, meta)
        reason = check_caption(caption, self.filters) or check_metadata(meta, self.filters)
        if reason:
            return reason
        label = None
        if self.label_key is not None:
            label = read_label(raw.get(self.label_key))
            if label is None:
                return "missing_label"
        ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
        if ext is None:
            return "missing_image"
        try:
            img = open_image(raw[ext])
        except Image.DecompressionBombError:
            return "too_large"
        except ImageDecodeError:
            return "decode_error"
        width, height = oriented_size(img)
        reason = check_image_size(width, height, self.filters)
        if reason:
            return reason
        res = self.transform.resolution
        size = self.buckets.nearest(width, height) if self.buckets is not None else (res, res)
        try:
            rgb = load_rgb(img, min_size=cover_size(width, height, *size))
        except ImageDecodeError:
            return "decode_error"
        except UnsupportedModeError:
            return "unsupported_mode"
        try:
            image, crop = self.transform(rgb, rng, size)
        except Exception as exn:  # a bug or a PIL edge case must cost one sample, not the run
            log.warning("transform failed for %s: %r", raw.get("__key__"), exn)
            return "transform_error"
        out = {
            "image": image,
            "caption": caption,
            "original_size": original_size(meta, height, width),
            "crop_coords": crop,
            "key": str(raw.get("__key__", "")),
            "bucket": size,
        }
        if label is not None:
            out["label"] = label
        return out
