"""Reference images and captions (webdataset shards or an image folder), and their feature statistics,
computed once and cached in a file named by a hash of everything they depend on.

`ref` is one of:
  - a `.npz` with `mu` and `sigma` (pytorch-fid's format, e.g. published COCO statistics: FID only), or one
    of our cache files (also holds the features, so KID works too);
  - webdataset shards: a `.tar` file, a brace pattern (`data/{00000..00009}.tar`), a glob, or a folder of
    `.tar` files; samples are read in shard order, their image (jpg/jpeg/png/webp) and caption (txt);
  - a folder of images (sorted by path, recursively).
The cache key hashes the sources (path, size, modification time of every file), the image count, the
image size and resize filter, and the feature extractor (class, identity, weights sha256, weights
fingerprint): change any of them and the statistics are computed again.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from ldm.eval.inception import file_sha256
from ldm.eval.metrics import RESIZE_FILTER, FeatureStats, extract, extractor_info, to_uint8

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def shard_paths(ref: str) -> list[Path]:
    """The shard files of `ref` (file, brace pattern, glob or folder), or [] when it names no shards."""
    from braceexpand import braceexpand

    path = Path(ref)
    if path.is_dir():
        return sorted(path.glob("*.tar"))
    paths = [Path(p) for pattern in braceexpand(ref) for p in sorted(glob.glob(pattern))]
    return [p for p in paths if p.suffix == ".tar"]


def read_shards(paths: list[Path]) -> Iterator[tuple[Image.Image, str | None]]:
    """(image, caption) of every sample of the shards, in order (webdataset layout: members named
    `key.ext`, one sample per key)."""
    for path in paths:
        sample, key = {}, None
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, _, ext = Path(member.name).name.partition(".")
                k = str(Path(member.name).parent / k)
                if k != key and sample:
                    yield from _sample(sample)
                    sample = {}
                key = k
                sample[ext.lower()] = tar.extractfile(member).read()
            if sample:
                yield from _sample(sample)


def _sample(sample: dict[str, bytes]) -> Iterator[tuple[Image.Image, str | None]]:
    image = next((sample[e] for e in ("jpg", "jpeg", "png", "webp") if e in sample), None)
    if image is not None:
        caption = sample["txt"].decode("utf-8").strip() if "txt" in sample else None
        yield Image.open(io.BytesIO(image)), caption


def folder_images(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS)


def sources(ref: str) -> tuple[str, list[Path]]:
    """("npz" | "shards" | "folder", files) of `ref`, or a clear error."""
    if ref.endswith(".npz"):
        if not Path(ref).is_file():
            raise FileNotFoundError(f"ref: statistics file not found: {ref}")
        return "npz", [Path(ref)]
    shards = shard_paths(ref)
    if shards:
        return "shards", shards
    if Path(ref).is_dir():
        files = folder_images(Path(ref))
        if files:
            return "folder", files
    raise FileNotFoundError(f"ref={ref}: not a .npz, webdataset shards (.tar) or a folder of images")


def read_captions(ref: str, n: int | None = None) -> list[str]:
    """The captions of the first `n` samples of shards (`prompts=shards` takes COCO-style captions)."""
    captions = []
    for _, caption in read_shards(shard_paths(ref)):
        if caption:
            captions.append(caption)
        if n is not None and len(captions) >= n:
            break
    if not captions:
        raise ValueError(f"prompts={ref}: no captions (.txt members) in these shards")
    return captions


def iter_images(kind: str, files: list[Path], n: int | None) -> Iterator[Image.Image]:
    stream = (img for img, _ in read_shards(files)) if kind == "shards" else (Image.open(p) for p in files)
    for i, image in enumerate(stream):
        if n is not None and i >= n:
            return
        yield image


def cache_key(ref: str, n: int | None, image_size: int | None, extractor: nn.Module) -> str:
    kind, files = sources(ref)
    info = dict(
        kind=kind, n=n, image_size=image_size, resize_filter=RESIZE_FILTER,
        extractor=extractor_info(extractor),
        files=[(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files],
    )  # fmt: skip
    return hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()


def reference_stats(
    ref: str, extractor: nn.Module, *, image_size: int | None, n: int | None = None, cache_dir: str | Path,
    batch_size: int = 50,
) -> tuple[FeatureStats, dict]:  # fmt: skip
    """(statistics, description) of the reference set, from the cache when it holds them."""
    kind, files = sources(str(ref))
    if kind == "npz":
        stats = FeatureStats.load(files[0])
        return stats, dict(source=str(ref), kind=kind, n=stats.n, stats_hash=file_sha256(files[0]))
    key = cache_key(str(ref), n, image_size, extractor)
    cache = Path(cache_dir).expanduser() / f"ref_{key[:24]}.npz"
    info = dict(source=str(ref), kind=kind, stats_hash=key, cache_file=str(cache))
    if cache.is_file():
        stats = FeatureStats.load(cache)
        return stats, dict(info, n=stats.n, cached=True)
    feats, batch = [], []
    for image in iter_images(kind, files, n):
        batch.append(image)
        if len(batch) == batch_size:
            feats.append(extract(extractor, to_uint8(batch, image_size), batch_size))
            batch = []
    if batch:
        feats.append(extract(extractor, to_uint8(batch, image_size), batch_size))
    stats = FeatureStats.from_features(torch.cat(feats))
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    stats.save(tmp)
    tmp.replace(cache)  # atomic: a second process never reads a half-written file
    return stats, dict(info, n=stats.n, cached=False)
