"""Latents and text embeddings of a small image set, computed once with the frozen encoders and reused.

Fine-tuning on a few hundred images (DreamBooth, a folder) spends most of a step in the frozen
autoencoder and text encoder, which give the same answer every epoch. As kohya-ss/sd-scripts
(`--cache_latents`) and diffusers' `train_dreambooth_lora_sdxl.py` (`--cache_latents`) do, each image is
encoded once; unlike them we keep the posterior's mean *and* std, so training can still sample
z = mean + std * noise (LDM's `sample_posterior`) with its own step generator, and the cached path
draws exactly what encoding on the fly draws. Captions are embedded once each, the empty caption too:
classifier-free caption dropout (Ho & Salimans 2022) swaps in its cached context.

Augmentations: a center crop is deterministic; a horizontal flip has two outcomes and both are cached
(the sample picks one with the same draw the image transform makes, so cached and uncached runs see
the same flips); random crops have too many outcomes and are refused with an error.

Layout: `<cache_dir>/<key>/images/<entry>.safetensors` (tensors `mean`, `std`: variants x C x h x w,
plus `original_size`, `crop_coords`) and `<cache_dir>/<key>/texts/<entry>.safetensors` (`context`),
with `manifest.json` naming what the key hashes. The key is a hash of the autoencoder's weights and
scale factor, the text encoder's weights, tokenizer and layer, the resolution and the augmentations, so
changing any of them reads (and fills) another folder. An image entry is named by the image's key and
a hash of its bytes: an edited image is re-encoded. A damaged entry is re-encoded and counted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import Dataset

from ldm.data.folder import pick_caption
from ldm.data.transforms import ImageTransform, cover_size, load_rgb, open_image

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def state_hash(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and bytes, in key order)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _tokenizer_hash(conditioner: nn.Module) -> str | None:
    """Hash of the tokenizer's vocabulary (the same weights with another vocabulary embed differently)."""
    tokenizer = getattr(conditioner, "tokenizer", None)
    if tokenizer is None:
        return None
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(vocab.encode()).hexdigest()


def cache_components(
    autoencoder: nn.Module, conditioner: nn.Module, resolution: int, random_crop: bool, random_flip: bool
) -> dict[str, Any]:
    """What the cached tensors depend on; the cache key is their hash."""
    return {
        "version": CACHE_VERSION,
        "autoencoder": state_hash(autoencoder),
        "scale_factor": float(getattr(autoencoder, "scale_factor", 1.0)),
        "text_encoder": state_hash(conditioner),
        "conditioner": type(conditioner).__name__,
        "tokenizer": _tokenizer_hash(conditioner),
        "layer": str(getattr(conditioner, "layer", None)),
        "max_length": getattr(conditioner, "max_length", None),
        "resolution": int(resolution),
        "random_crop": bool(random_crop),
        "random_flip": bool(random_flip),
    }


def _entry_name(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else p.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


class LatentCache:
    """One cache folder for one key; `stats` counts hits, misses and damaged entries."""

    def __init__(self, cache_dir: str | Path, components: dict[str, Any]):
        self.components = components
        self.key = hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = Path(cache_dir) / self.key
        self.stats: Counter[str] = Counter()

    def image_path(self, key: str, data: bytes) -> Path:
        """Entry of one image: named by its key in the data set and the hash of its bytes."""
        return self.dir / "images" / f"{_entry_name(key, hashlib.sha256(data).digest())}.safetensors"

    def text_path(self, caption: str) -> Path:
        """Entry of one caption's context."""
        return self.dir / "texts" / f"{_entry_name(caption)}.safetensors"

    def read(self, path: Path, names: Sequence[str]) -> dict[str, Tensor] | None:
        """The entry's tensors, or None when it is missing or damaged (a damaged file is removed)."""
        if not path.is_file():
            return None
        try:
            tensors = load_file(path)
            if not all(n in tensors and torch.isfinite(tensors[n].float()).all() for n in names):
                raise ValueError(f"missing or non-finite tensors (want {list(names)})")
        except Exception as exn:  # truncated header, bad JSON, short data: safetensors raises several types
            log.warning("latent cache: damaged entry %s (%s); encoding again", path, exn)
            self.stats["corrupt"] += 1
            path.unlink(missing_ok=True)
            return None
        return tensors

    def write(self, path: Path, tensors: dict[str, Tensor]) -> None:
        """Write atomically (temporary file, then rename): an interrupted write leaves no half entry."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
        manifest = self.dir / "manifest.json"
        if not manifest.exists():
            manifest.write_text(json.dumps(self.components, indent=1, sort_keys=True))


@torch.no_grad()
def encode_images(autoencoder: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """Unscaled posterior mean and std of images in [-1, 1], in fp32 (as the system encodes)."""
    device = next(autoencoder.parameters()).device
    with torch.autocast(device.type, enabled=False):
        posterior = autoencoder.encode(images.to(device).float())
    return posterior.mean.float().cpu(), posterior.std.float().cpu()


@torch.no_grad()
def embed_captions(conditioner: nn.Module, captions: Sequence[str]) -> Tensor:
    """Context of each caption, fp32 on the CPU."""
    return conditioner(list(captions)).float().cpu()


def fill_image_cache(
    cache: LatentCache, items: Sequence[Any], transform: ImageTransform, autoencoder: nn.Module,
    batch_size: int = 16,
) -> tuple[dict[str, dict[str, Tensor]], list[Any]]:  # fmt: skip
    """Cached tensors of each readable item (key -> {mean, std, original_size, crop_coords}, one row per
    flip variant: [unflipped, flipped] with `transform.random_flip`), encoding the misses in batches.
    Returns the entries and the items that could not be read (left out)."""
    if transform.random_crop:
        raise ValueError(
            "data.cache_latents=true with data.random_crop=true: random crops have too many outcomes to "
            "cache; use center crops (random_crop=false) or turn the cache off"
        )
    entries: dict[str, dict[str, Tensor]] = {}
    pending: list[tuple[Any, Path, Tensor, tuple[int, int], list[tuple[int, int]]]] = []
    unreadable: list[Any] = []
    center = ImageTransform(transform.resolution, random_crop=False, random_flip=False)

    def flush() -> None:
        if not pending:
            return
        mean, std = encode_images(autoencoder, torch.cat([p[2] for p in pending]))
        row = 0
        for item, path, variants, size, crops in pending:
            n = len(variants)
            entry = {
                "mean": mean[row : row + n].clone(), "std": std[row : row + n].clone(),
                "original_size": torch.tensor(size, dtype=torch.long),
                "crop_coords": torch.tensor(crops, dtype=torch.long),
            }  # fmt: skip
            cache.write(path, entry)
            entries[item.key] = entry
            row += n
        pending.clear()

    for item in items:
        try:
            data = item.path.read_bytes()
        except OSError:  # gone since the scan
            unreadable.append(item)
            cache.stats["unreadable"] += 1
            continue
        path = cache.image_path(item.key, data)
        hit = cache.read(path, ("mean", "std", "original_size", "crop_coords"))
        if hit is not None:
            cache.stats["hit"] += 1
            entries[item.key] = hit
            continue
        try:
            img = load_rgb(open_image(data))
        except Exception:  # what the uncached dataset skips too: left out of the cached one
            log.warning("latent cache: skipping unreadable image %s", item.path)
            unreadable.append(item)
            cache.stats["unreadable"] += 1
            continue
        cache.stats["miss"] += 1
        image, (top, left) = center(img, random.Random(0))
        variants, crops = [image], [(top, left)]
        if transform.random_flip:  # the mirrored crop's left edge is measured in the mirrored image
            rw, _ = cover_size(img.width, img.height, transform.resolution, transform.resolution)
            variants.append(torch.flip(image, dims=[-1]))
            crops.append((top, rw - transform.resolution - left))
        pending.append((item, path, torch.stack(variants), (img.height, img.width), crops))
        if sum(len(p[2]) for p in pending) >= batch_size:
            flush()
    flush()
    return entries, unreadable


def fill_text_cache(
    cache: LatentCache, captions: Sequence[str], conditioner: nn.Module, batch_size: int = 32
) -> dict[str, Tensor]:
    """Context of each caption and of the empty caption (caption dropout), encoding the misses."""
    out: dict[str, Tensor] = {}
    missing: list[str] = []
    for caption in dict.fromkeys(["", *captions]):
        hit = cache.read(cache.text_path(caption), ("context",))
        if hit is None:
            missing.append(caption)
            cache.stats["text_miss"] += 1
        else:
            out[caption] = hit["context"]
            cache.stats["text_hit"] += 1
    for i in range(0, len(missing), batch_size):
        chunk = missing[i : i + batch_size]
        for caption, context in zip(chunk, embed_captions(conditioner, chunk)):
            context = context.clone()
            cache.write(cache.text_path(caption), {"context": context})
            out[caption] = context
    return out


class CachedLatentDataset(Dataset):
    """`ImageFolderDataset`'s samples with cached tensors in place of decoded images: `latent_mean`,
    `latent_std` (unscaled, C x h x w), `context` and `uncond_context` (max_length x D), plus the
    caption, key, original size and crop coordinates. The flip and caption are drawn from the same
    (seed, epoch, index) generator, in the same order, as the image dataset draws them."""

    def __init__(
        self, items: Sequence[Any], entries: dict[str, dict[str, Tensor]], contexts: dict[str, Tensor],
        repeats: int = 1, instance_prompt: str | None = None, random_flip: bool = False, seed: int = 0,
    ) -> None:  # fmt: skip
        if not items:
            raise ValueError("no readable images to cache")
        self.items, self.entries, self.contexts = list(items), entries, contexts
        self.repeats, self.instance_prompt = repeats, instance_prompt
        self.random_flip, self.seed = random_flip, seed

    def __len__(self) -> int:
        """Images times repeats."""
        return len(self.items) * self.repeats

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        """Sample `index`, or `(index, epoch)` from `EpochSampler` (see `ImageFolderDataset`)."""
        if isinstance(index, tuple):
            index, epoch = index
            rng = random.Random(f"folder/{self.seed}/{epoch}/{index}")
        else:
            rng = random.Random(int(torch.randint(0, 2**62, (1,)).item()))
        item = self.items[index % len(self.items)]
        entry = self.entries[item.key]
        variant = 1 if self.random_flip and rng.random() < 0.5 else 0  # ImageTransform's flip draw
        caption = pick_caption(item, self.instance_prompt, rng)
        return {
            "latent_mean": entry["mean"][variant], "latent_std": entry["std"][variant],
            "context": self.contexts[caption], "uncond_context": self.contexts[""], "caption": caption,
            "original_size": entry["original_size"], "crop_coords": entry["crop_coords"][variant],
            "key": item.key, "skipped": {},
        }  # fmt: skip

    @staticmethod
    def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Stack samples into a batch: tensors stacked, captions and keys as lists."""
        batch: dict[str, Any] = {
            "caption": [s["caption"] for s in samples],
            "key": [s["key"] for s in samples],
        }
        for name in (
            "latent_mean",
            "latent_std",
            "context",
            "uncond_context",
            "original_size",
            "crop_coords",
        ):
            batch[name] = torch.stack([s[name] for s in samples])
        batch["skipped"] = {}
        return batch


def item_captions(dataset: Any) -> list[str]:
    """Every caption a dataset's samples can carry (its instance prompt, or each item's captions)."""
    if dataset.instance_prompt is not None:
        return [dataset.instance_prompt]
    out: list[str] = []
    for item in dataset.items:
        out.extend(item.caption if isinstance(item.caption, tuple) else [item.caption])
    return out


def cached_dataset(
    dataset: Any, autoencoder: nn.Module, conditioner: nn.Module, cache_dir: str | Path, batch_size: int = 16
) -> tuple[CachedLatentDataset, LatentCache]:
    """The cached counterpart of an `ImageFolderDataset` (its items, transform, repeats, prompt, seed),
    filling the cache where entries are missing. Encodes on the GPU when there is one."""
    tf = dataset.transform
    components = cache_components(autoencoder, conditioner, tf.resolution, tf.random_crop, tf.random_flip)
    cache = LatentCache(cache_dir, components)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    places = [next(m.parameters()).device for m in (autoencoder, conditioner)]
    try:
        autoencoder.to(device), conditioner.to(device)
        entries, _ = fill_image_cache(cache, dataset.items, tf, autoencoder, batch_size)
        contexts = fill_text_cache(cache, item_captions(dataset), conditioner)
    finally:
        autoencoder.to(places[0]), conditioner.to(places[1])
    items = [item for item in dataset.items if item.key in entries]
    log.info("latent cache %s: %s", cache.dir, dict(cache.stats))
    cached = CachedLatentDataset(
        items, entries, contexts, dataset.repeats, dataset.instance_prompt, tf.random_flip, dataset.seed
    )
    return cached, cache
