"""The bundled data sets: scikit-learn's handwritten digits as shards, and its two sample photos.

Digits: `sklearn.datasets.load_digits` holds 1,797 real 8 x 8 scans (UCI "Optical Recognition of
Handwritten Digits", 17 grey levels 0-16, ink high). They are scaled to 0-255 (white ink on black, as
MNIST), enlarged with PIL's bicubic filter to `resolution` (32 px by default) and stored as lossless
PNG in img2dataset-layout shards with the caption "a photo of the digit seven", the label in the
.json and in a `{key}.cls` member (webdataset's label convention). Bicubic rather than nearest: nearest
turns every source pixel into a hard 4 x 4 block whose edges a model must spend capacity on; bicubic
gives smooth strokes like a pen's, and at 4x enlargement its overshoot is slight (clipped to 0-255).

A fixed, stratified, seeded 10% of each class is held out for validation. `prepare_digits` writes the
two shard sets once and records them in a manifest; later calls with the same settings reuse them.

`DigitsDataModule` serves them through `WebDataModule`, so the default experiment exercises the exact
path LAION shards take.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ldm.data.shards import ShardWriter
from ldm.data.webdataset import WebDataModule

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Bump when the bytes written change (filter, captions, layout), so old prepared sets are rewritten.
DIGITS_VERSION = 2
PHOTOS_VERSION = 1
PHOTO_CAPTIONS = {"china": "a photo of a chinese pagoda by a lake", "flower": "a photo of an orange dahlia"}


def digit_caption(label: int) -> str:
    """The caption of a digit image: "a photo of the digit seven"."""
    return f"a photo of the digit {NUMBER_WORDS[label]}"


def digit_image(pixels: np.ndarray, resolution: int = 32) -> Image.Image:
    """One 8 x 8 sklearn digit (values 0-16) as an RGB image of `resolution` pixels (bicubic)."""
    grey = Image.fromarray(np.rint(pixels * (255.0 / 16.0)).astype(np.uint8), mode="L")
    if resolution != grey.width:
        grey = grey.resize((resolution, resolution), Image.Resampling.BICUBIC)
    return grey.convert("RGB")


def split_digits(labels: np.ndarray, val_fraction: float = 0.1, seed: int = 0) -> tuple[list[int], list[int]]:
    """(train, val) indices: `val_fraction` of each class held out (stratified), both in a seeded
    random order so that every shard mixes the classes."""
    rng = random.Random(f"digits-split/{seed}")
    train: list[int] = []
    val: list[int] = []
    for c in sorted(set(labels.tolist())):
        idx = [int(i) for i in np.flatnonzero(labels == c)]
        rng.shuffle(idx)
        n_val = round(len(idx) * val_fraction)
        val += idx[:n_val]
        train += idx[n_val:]
    rng.shuffle(train)
    rng.shuffle(val)
    return train, val


def _prepared(out: Path, params: dict[str, Any], build: Callable[[Path], dict[str, list[str]]]) -> dict:
    """Write a data set once: reuse `out` when its manifest records the same `params` and all its files
    exist; else `build(tmp_dir)` (returning split -> relative file names) into a temporary folder,
    record the manifest there, and move the folder into place, so a half-written set is never used."""

    def valid(folder: Path) -> dict | None:
        """The folder's manifest if it is complete and written with `params`, else None."""
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
        except (OSError, ValueError):
            return None
        files = [folder / f for names in manifest.get("splits", {}).values() for f in names]
        return manifest if manifest.get("params") == params and all(f.is_file() for f in files) else None

    manifest = valid(out)
    if manifest is None:
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        manifest = {"params": params, "splits": build(tmp)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if valid(out) is not None:  # another process finished first: keep its copy
            shutil.rmtree(tmp)
        else:
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
    return {split: [str(out / f) for f in names] for split, names in manifest["splits"].items()}


def _shard_size(n: int, shards: int) -> int:
    """Samples per shard that spread `n` samples over `shards` shards."""
    return max(1, math.ceil(n / max(1, shards)))


def digits_dir(root: str | Path, resolution: int) -> Path:
    """Where the digits at one resolution live: `{root}/{resolution}px`."""
    return Path(root) / f"{resolution}px"


def digits_urls(
    root: str | Path = "data/digits",
    resolution: int = 32,
    val_fraction: float = 0.1,
    train_shards: int = 8,
    val_shards: int = 2,
) -> tuple[list[str], list[str]]:
    """The shard paths `prepare_digits` writes (known before writing: shard counts are fixed)."""
    n_val = sum(round(c * val_fraction) for c in _class_counts())
    n_train = len(_load()[1]) - n_val
    out = digits_dir(root, resolution)
    n_train_shards = math.ceil(n_train / _shard_size(n_train, train_shards))
    n_val_shards = math.ceil(n_val / _shard_size(n_val, val_shards))
    train = [str(out / "train" / f"{i:05d}.tar") for i in range(n_train_shards)]
    val = [str(out / "val" / f"{i:05d}.tar") for i in range(n_train_shards, n_train_shards + n_val_shards)]
    return train, val


@functools.cache
def _load() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits: images (1797, 8, 8) in 0-16 and labels (1797,)."""
    from sklearn.datasets import load_digits  # optional dependency, needed only for the bundled data

    data = load_digits()
    return data.images, data.target


def _class_counts() -> list[int]:
    """Images per class (0-9) in sklearn's digits."""
    return np.bincount(_load()[1], minlength=10).tolist()


def prepare_digits(
    root: str | Path = "data/digits",
    resolution: int = 32,
    val_fraction: float = 0.1,
    seed: int = 0,
    train_shards: int = 8,
    val_shards: int = 2,
) -> tuple[list[str], list[str]]:
    """Write (once) the digits as `{root}/{resolution}px/{train,val}/NNNNN.tar` (val numbered on from
    train: train/00000-00007, val/00008-00009); returns the train and val shard paths. Eight train
    shards by default, so up to 2 ranks x 4 workers read whole shards, and two val shards, one per
    rank. Lightning calls this through `DigitsDataModule.prepare_data` on one process per node."""
    images, labels = _load()
    params = dict(
        version=DIGITS_VERSION,
        resolution=resolution,
        val_fraction=val_fraction,
        seed=seed,
        train_shards=train_shards,
        val_shards=val_shards,
    )

    def build(tmp: Path) -> dict[str, list[str]]:
        """Write both splits into `tmp`; their shard paths relative to it."""
        train, val = split_digits(labels, val_fraction, seed)
        splits: dict[str, list[str]] = {}
        for split, indices, shards in (("train", train, train_shards), ("val", val, val_shards)):
            # Val shards number on from the train shards, so keys are unique over the whole set.
            start = len(splits.get("train", []))
            size = _shard_size(len(indices), shards)
            with ShardWriter(tmp / split, size, fmt="png", start_shard=start) as writer:
                for i in indices:
                    label = int(labels[i])
                    writer.add_image(
                        digit_image(images[i], resolution),
                        digit_caption(label),
                        original_size=(8, 8),  # the scan's size: what SDXL-style conditioning should see
                        meta={"label": label, "index": i},
                        extra={"cls": str(label).encode()},
                        url=f"sklearn:digits/{i}",
                    )
            splits[split] = [p.relative_to(tmp).as_posix() for p in writer.paths]
        return splits

    splits = _prepared(digits_dir(root, resolution), params, build)
    return splits["train"], splits["val"]


def load_sample_photos() -> dict[str, Image.Image]:
    """scikit-learn's two bundled photos (427 x 640 JPEGs): {"china": ..., "flower": ...}."""
    from sklearn.datasets import load_sample_image

    return {name: Image.fromarray(load_sample_image(f"{name}.jpg")) for name in PHOTO_CAPTIONS}


def random_crops(
    photos: dict[str, Image.Image], n: int, size: int, seed: int = 0, min_fraction: float = 0.25
) -> list[tuple[str, Image.Image]]:
    """`n` square crops (name, image) of `size` pixels, alternating between the photos: a random side
    between `min_fraction` and all of the short side, at a random place, resized (antialiased)."""
    rng = random.Random(f"photo-crops/{seed}")
    names = sorted(photos)
    out = []
    for i in range(n):
        name = names[i % len(names)]
        img = photos[name]
        short = min(img.size)
        side = rng.randint(max(1, round(short * min_fraction)), short)
        left, top = rng.randint(0, img.width - side), rng.randint(0, img.height - side)
        crop = img.crop((left, top, left + side, top + side))
        resample = Image.Resampling.LANCZOS if side > size else Image.Resampling.BICUBIC
        out.append((name, crop.resize((size, size), resample)))
    return out


def prepare_sample_photos(
    root: str | Path = "data/photos", resolution: int = 64, n: int = 128, seed: int = 0, shard_size: int = 32
) -> list[str]:
    """Write (once) `n` random crops of the sample photos as JPEG shards in
    `{root}/{resolution}px_{n}/`, captioned by photo; natural images for autoencoder tests."""
    params = dict(version=PHOTOS_VERSION, resolution=resolution, n=n, seed=seed, shard_size=shard_size)

    def build(tmp: Path) -> dict[str, list[str]]:
        """Write the crops into `tmp`; their shard paths relative to it."""
        with ShardWriter(tmp, shard_size, fmt="jpg", quality=95) as writer:
            for i, (name, img) in enumerate(random_crops(load_sample_photos(), n, resolution, seed)):
                writer.add_image(img, PHOTO_CAPTIONS[name], url=f"sklearn:{name}.jpg/crop{i}")
        return {"train": [p.relative_to(tmp).as_posix() for p in writer.paths]}

    return _prepared(Path(root) / f"{resolution}px_{n}", params, build)["train"]


class DigitsDataModule(WebDataModule):
    """The digits through the WebDataset pipeline (configs/data/digits.yaml); batches carry "label".

    Defaults differ from LAION's: finite epochs (each digit once per epoch), no flip (a mirrored digit
    is not a digit), no random crop (the shards are already at `resolution`). Other `WebDataModule`
    arguments pass through `kwargs`.
    """

    def __init__(
        self,
        root: str | Path = "data/digits",
        resolution: int = 32,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
        train_shards: int = 8,
        val_shards: int = 2,
        resampled: bool = False,
        shuffle_buffer: int = 1000,
        random_flip: bool = False,
        random_crop: bool = False,
        **kwargs: Any,
    ) -> None:
        self.digits = dict(
            root=str(root),
            resolution=resolution,
            val_fraction=val_fraction,
            train_shards=train_shards,
            val_shards=val_shards,
        )
        train, val = digits_urls(**self.digits)
        super().__init__(
            urls=train,
            val_urls=val,
            resolution=resolution,
            batch_size=batch_size,
            num_workers=num_workers,
            resampled=resampled,
            shuffle_buffer=shuffle_buffer,
            random_flip=random_flip,
            random_crop=random_crop,
            label_key="cls",
            seed=seed,
            **kwargs,
        )
        # The split seed is fixed: a run's seed changes the order and augmentation, not which digits
        # are held out, so validation numbers stay comparable across runs.
        self.split_seed = 0

    def prepare_data(self) -> None:
        """Write the shards if they are not there yet (Lightning: once per node, before setup)."""
        train, val = prepare_digits(seed=self.split_seed, **self.digits)
        if (train, val) != digits_urls(**self.digits):  # the loaders were built on the predicted paths
            raise RuntimeError(f"digits shards {train + val} differ from the predicted paths")

    def setup(self, stage: str | None = None) -> None:
        """Make sure the shards exist when used without a Trainer (a no-op after `prepare_data`)."""
        self.prepare_data()
