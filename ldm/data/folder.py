"""A folder of images with captions as a LightningDataModule (fine-tuning, DreamBooth-style sets).

Two layouts, as diffusers' `ImageFolder` / `train_text_to_image.py` and kohya-ss/sd-scripts read them:

- `metadata.jsonl` or `metadata.csv` in the root, one row per image, with the image's path relative to
  the root in `image_column` ("file_name") and its caption in `caption_column` ("text"); a caption may be
  a list in jsonl, and one of them is drawn each time the image is read;
- otherwise every image under the root (recursively), captioned by the `.txt` file of the same stem next
  to it ("" when there is none: unconditional).

`instance_prompt` replaces every caption (DreamBooth, Ruiz et al. 2022). Missing, unreadable and
truncated images never stop training: they are skipped, counted by reason (the names of
`ldm.data.stats.SKIP_REASONS`) in `skip_counts`, and logged in one warning.
"""

from __future__ import annotations

import csv
import json
import logging
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ldm.data.stats import accumulate
from ldm.data.transforms import (
    ImageDecodeError,
    ImageTransform,
    UnsupportedModeError,
    load_rgb,
    open_image,
)
from ldm.data.webdataset import collate, resolve_rank, resume_position

log = logging.getLogger(__name__)

# What PIL reads without plug-ins; upper-case suffixes are matched too.
FOLDER_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
# A truncated file found while training is replaced by the next image; give up after this many in a row
# (then the folder is mostly broken and an error says more than a silent stream of substitutes).
_MAX_CONSECUTIVE_FAILURES = 16


@dataclass(frozen=True)
class FolderItem:
    """One image of a folder: its path, caption (or captions to draw from) and key (relative path
    without the suffix, in POSIX form, so it is the same on every OS)."""

    path: Path
    caption: str | tuple[str, ...]
    key: str


def _key(path: Path, root: Path) -> str:
    """The key of an image: its path relative to the root without the suffix."""
    return path.relative_to(root).with_suffix("").as_posix()


def _caption_value(value: Any) -> str | tuple[str, ...]:
    """A metadata caption cell as a string, or a tuple of strings when jsonl gives a list."""
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return tuple(str(v).strip() for v in value) or ""
    return str(value).strip()


def _metadata_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a metadata.jsonl (blank lines ignored) or metadata.csv (header row names the columns)."""
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def scan_folder(
    root: str | Path,
    caption_column: str = "text",
    image_column: str = "file_name",
    skip_counts: Counter[str] | None = None,
) -> list[FolderItem]:
    """The images of a folder in either layout (see the module docstring), sorted by key so that every
    process and every run sees the same order. Rows naming a missing file are counted as
    "missing_image" in `skip_counts` and left out."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    skip_counts = skip_counts if skip_counts is not None else Counter()
    meta = next((root / m for m in METADATA_FILES if (root / m).is_file()), None)
    items: list[FolderItem] = []
    if meta is not None:
        for i, row in enumerate(_metadata_rows(meta)):
            if image_column not in row or caption_column not in row:
                raise KeyError(
                    f"{meta} row {i} lacks column {image_column!r} or {caption_column!r}: {sorted(row)}"
                )
            path = root / str(row[image_column])
            if not path.is_file():
                skip_counts["missing_image"] += 1
                log.debug("%s names a missing image %s", meta, path)
                continue
            items.append(FolderItem(path, _caption_value(row[caption_column]), _key(path, root)))
    else:
        for path in root.rglob("*"):
            if path.suffix.lower() in FOLDER_IMAGE_EXTENSIONS and path.is_file():
                txt = path.with_suffix(".txt")
                caption = txt.read_text(encoding="utf-8", errors="replace").strip() if txt.is_file() else ""
                items.append(FolderItem(path, caption, _key(path, root)))
    return sorted(items, key=lambda item: item.key)


def check_headers(items: Sequence[FolderItem], skip_counts: Counter[str]) -> list[FolderItem]:
    """The items whose header PIL can parse; the others are counted as "decode_error". Only the header
    is read (milliseconds per file); a file truncated after it is caught when it is decoded."""
    good = []
    for item in items:
        try:
            with Image.open(item.path):
                pass
        except Image.DecompressionBombError:
            skip_counts["too_large"] += 1
        except Exception:  # UnidentifiedImageError, OSError on empty files, struct errors, ...
            skip_counts["decode_error"] += 1
            log.debug("unreadable image %s", item.path)
        else:
            good.append(item)
    return good


def split_items(
    items: Sequence[FolderItem], val_fraction: float, seed: int
) -> tuple[list[FolderItem], list[FolderItem]]:
    """(train, val): a seeded random `val_fraction` of the items, at least one when the fraction is
    positive, held out; the same split in every process because `items` arrive sorted."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = max(1, round(len(items) * val_fraction)) if val_fraction > 0 and len(items) > 1 else 0
    order = list(range(len(items)))
    random.Random(f"folder-split/{seed}").shuffle(order)
    held = set(order[:n_val])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def pick_caption(item: FolderItem, instance_prompt: str | None, rng: random.Random) -> str:
    """The caption of one draw: the fixed instance prompt (DreamBooth), else one of the image's captions
    (several lines in its .txt: one at random per draw), else its only caption."""
    if instance_prompt is not None:
        return instance_prompt
    if isinstance(item.caption, tuple):
        return rng.choice(item.caption)
    return item.caption


class ImageFolderDataset(Dataset):
    """Map-style dataset over `FolderItem`s, `repeats` times over (kohya's / diffusers DreamBooth's
    `repeats`), returning samples in the data contract's per-sample form."""

    def __init__(
        self,
        items: Sequence[FolderItem],
        transform: ImageTransform,
        repeats: int = 1,
        instance_prompt: str | None = None,
        seed: int = 0,
    ) -> None:
        if not items:
            raise ValueError("no readable images")
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        self.items, self.transform = list(items), transform
        self.repeats, self.instance_prompt, self.seed = repeats, instance_prompt, seed

    def __len__(self) -> int:
        """Images times repeats."""
        return len(self.items) * self.repeats

    def _load(self, item: FolderItem, rng: random.Random) -> dict[str, Any]:
        """Decode, transform and caption one image (raises ImageDecodeError / UnsupportedModeError)."""
        img = load_rgb(open_image(item.path.read_bytes()))  # upright RGB: EXIF rotation applied
        image, crop = self.transform(img, rng)
        caption = pick_caption(item, self.instance_prompt, rng)
        return {
            "image": image,
            "caption": caption,
            "original_size": (img.height, img.width),
            "crop_coords": crop,
            "key": item.key,
        }

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        """Sample `index`, or `(index, epoch)` from `EpochSampler`; an image that fails to decode is
        counted under "skipped" and the next image is returned in its place, so batches keep their size
        (uneven batches would stall DDP)."""
        if isinstance(index, tuple):
            # Crops, flips and caption picks as a function of (seed, epoch, index): the same in a resumed
            # run, whatever the number of workers (string seeds are hashed with SHA-512 by `random`).
            index, epoch = index
            rng = random.Random(f"folder/{self.seed}/{epoch}/{index}")
        else:
            # Seeded from torch's generator, which DataLoader seeds per worker from the main process's
            # (seed_everything) generator: reproducible runs, different crops every epoch.
            rng = random.Random(int(torch.randint(0, 2**62, (1,)).item()))
        skipped: Counter[str] = Counter()
        n = len(self.items)
        for attempt in range(min(n, _MAX_CONSECUTIVE_FAILURES)):
            item = self.items[(index + attempt) % n]
            try:
                sample = self._load(item, rng)
            except (ImageDecodeError, OSError):  # OSError: the file went away since the scan
                skipped["decode_error"] += 1
            except Image.DecompressionBombError:
                skipped["too_large"] += 1
            except UnsupportedModeError:
                skipped["unsupported_mode"] += 1
            else:
                sample["skipped"] = dict(skipped)
                return sample
            log.warning("skipping unreadable image %s", item.path)
        raise RuntimeError(f"{_MAX_CONSECUTIVE_FAILURES} images in a row failed to decode near {index}")


class EpochSampler(DistributedSampler):
    """The training order: this rank's share of a permutation seeded by (seed, epoch), each index paired
    with its epoch so the dataset seeds augmentation from them rather than from the process's RNG state,
    which a resumed run does not share. The first pass leaves out its first `skip` samples (a resumed
    run's batches already trained); its length stays the epoch's, which Lightning counts batches against.

    torch's DistributedSampler supplies the split and the permutation (`set_epoch`, which Lightning calls
    at every epoch start: lightning_fabric/utilities/data.py `_set_sampler_epoch`), and Lightning keeps a
    DistributedSampler as it is under DDP instead of wrapping it in its own (pytorch_lightning/trainer/
    connectors/data_connector.py `_requires_distributed_sampler`)."""

    def __init__(self, dataset: Dataset, *, seed: int, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1, epoch: int = 0, skip: int = 0) -> None:  # fmt: skip
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
        self.set_epoch(epoch)
        self._skip = skip

    def __iter__(self):
        """(index, epoch) pairs of this epoch, after the samples to pass over once."""
        indices, self._skip = list(super().__iter__())[self._skip :], 0
        return iter([(i, self.epoch) for i in indices])


def collate_folder(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples into a contract batch whose "skipped" sums the samples' skip counts."""
    skipped: Counter[str] = Counter()
    for s in samples:
        accumulate(skipped, s.get("skipped"))
    return collate(samples, dict(skipped))


class _CountingLoader(DataLoader):
    """A DataLoader that adds each batch's "skipped" counts to a running Counter in the main process
    (skips found in workers would otherwise never reach the DataModule)."""

    def __init__(self, *args: Any, skip_counts: Counter[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skip_counts = skip_counts

    def __iter__(self):
        """Batches, counting skips as they pass."""
        for batch in super().__iter__():
            accumulate(self.skip_counts, batch.get("skipped"))
            yield batch


class FolderDataModule(pl.LightningDataModule):
    """LightningDataModule over an image folder (configs/data/folder.yaml); batches follow the data
    contract. Validation is `val_root` (same layouts) or a seeded `val_fraction` of `root`, read in
    order with center crops and no flip; without either there is no validation.

    `skip_counts` holds the images skipped so far (missing, unreadable, truncated), by reason.
    """

    def __init__(
        self,
        root: str | Path,
        resolution: int = 512,
        batch_size: int = 4,
        num_workers: int = 2,
        caption_column: str = "text",
        image_column: str = "file_name",
        repeats: int = 1,
        instance_prompt: str | None = None,
        random_crop: bool = False,
        random_flip: bool = True,
        val_fraction: float = 0.0,
        val_root: str | Path | None = None,
        seed: int = 0,
        drop_last: bool = True,
        pin_memory: bool | None = None,
        cache_latents: bool = False,
        cache_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        if val_root is not None and val_fraction > 0:
            raise ValueError("give val_root or val_fraction, not both")
        self.root, self.val_root = Path(root), Path(val_root) if val_root is not None else None
        self.resolution, self.batch_size, self.num_workers = resolution, batch_size, num_workers
        self.caption_column, self.image_column = caption_column, image_column
        self.repeats, self.instance_prompt = repeats, instance_prompt
        self.random_crop, self.random_flip = random_crop, random_flip
        self.val_fraction, self.seed, self.drop_last = val_fraction, seed, drop_last
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.skip_counts: Counter[str] = Counter()
        # Latents + text embeddings computed once (ldm.data.latent_cache), by default next to the data.
        self.cache_latents = cache_latents
        self.cache_dir = Path(cache_dir) if cache_dir is not None else self.root / ".latent_cache"
        self.encoders: tuple[Any, Any] | None = None  # (autoencoder, conditioner); else the trainer's model
        self.cache_stats: Counter[str] = Counter()
        self.train_dataset: ImageFolderDataset | None = None
        self.val_dataset: ImageFolderDataset | None = None

    def _scan(self, root: Path) -> list[FolderItem]:
        """Readable items of `root`, counting what was left out."""
        items = scan_folder(root, self.caption_column, self.image_column, self.skip_counts)
        return check_headers(items, self.skip_counts)

    def setup(self, stage: str | None = None) -> None:
        """Scan the folder(s) once; warn with the counts if anything was skipped."""
        if self.train_dataset is not None:
            return
        items = self._scan(self.root)
        val_items: list[FolderItem] = self._scan(self.val_root) if self.val_root is not None else []
        if self.val_fraction > 0:
            items, val_items = split_items(items, self.val_fraction, self.seed)
        if self.skip_counts:
            log.warning("image folder %s: skipped %s", self.root, dict(self.skip_counts))
        train_tf = ImageTransform(self.resolution, self.random_crop, self.random_flip)
        self.train_dataset = ImageFolderDataset(
            items, train_tf, self.repeats, self.instance_prompt, seed=self.seed
        )
        if val_items:
            val_tf = ImageTransform(self.resolution, random_crop=False, random_flip=False)
            self.val_dataset = ImageFolderDataset(val_items, val_tf, 1, self.instance_prompt)
        if self.cache_latents:
            self.train_dataset = self.cached(self.train_dataset)
            self.val_dataset = self.cached(self.val_dataset) if self.val_dataset is not None else None

    def cached(self, dataset: ImageFolderDataset) -> Dataset:
        """`dataset` read from the latent cache (filled where missing) with the model's frozen encoders."""
        from ldm.data.latent_cache import cached_dataset

        encoders = self.encoders
        if encoders is None:
            model = self.trainer.lightning_module if self.trainer is not None else None
            if model is None or not hasattr(model, "autoencoder") or not hasattr(model, "conditioner"):
                raise ValueError(
                    "data.cache_latents=true needs the frozen autoencoder and text encoder: train a "
                    "LatentDiffusionSystem, or set datamodule.encoders = (autoencoder, conditioner)"
                )
            if getattr(model, "cond_key", "caption") != "caption":
                raise ValueError(
                    f"data.cache_latents=true caches caption embeddings; model.cond_key={model.cond_key!r}"
                )
            encoders = (model.autoencoder, model.conditioner)
        out, cache = cached_dataset(dataset, *encoders, self.cache_dir)
        self.cache_stats.update(cache.stats)
        return out

    def _loader(self, dataset: ImageFolderDataset, train: bool) -> _CountingLoader:
        """A DataLoader with the contract collate; training shuffles (`EpochSampler`: a resumed run
        continues the epoch it stopped in, with the same order and augmentation) and drops a ragged last
        batch (when there is more than one batch) so every step sees `batch_size` images."""
        sampler = None
        if train:
            trainer = self.trainer
            rank, world_size = resolve_rank(trainer=trainer)
            epoch, batches = resume_position(trainer)
            sampler = EpochSampler(dataset, seed=self.seed, rank=rank, world_size=world_size, epoch=epoch,
                                   skip=batches * self.batch_size)  # fmt: skip
        return _CountingLoader(
            dataset,
            skip_counts=self.skip_counts,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=train and self.drop_last and len(dataset) > self.batch_size,
            num_workers=self.num_workers,
            collate_fn=getattr(dataset, "collate", collate_folder),
            pin_memory=self.pin_memory,
            persistent_workers=train and self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches."""
        self.setup("fit")
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> DataLoader | list:
        """Ordered validation batches ([] when there is no validation set; Lightning then skips it)."""
        self.setup("validate")
        return [] if self.val_dataset is None else self._loader(self.val_dataset, train=False)
