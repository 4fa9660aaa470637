"""The bundled digits and sample photos (ldm/data/digits.py): counts, captions against labels, pixels,
the fixed split, idempotent preparation and DigitsDataModule batches."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from ldm.data.digits import (
    DigitsDataModule,
    digit_caption,
    digit_image,
    digits_urls,
    prepare_digits,
    prepare_sample_photos,
    random_crops,
)

WORDS = "zero one two three four five six seven eight nine".split()


def samples(urls: list[str]) -> list[dict[str, bytes]]:
    """Every sample (suffix -> bytes) of some shards, read with tarfile alone."""
    out: dict[str, dict[str, bytes]] = {}
    for url in urls:
        with tarfile.open(url) as tar:
            for m in tar.getmembers():
                key, suffix = m.name.split(".", 1)
                out.setdefault(key, {})[suffix] = tar.extractfile(m).read()
    return list(out.values())


def mtimes(folder: Path) -> dict[str, int]:
    """Modification time of every file under `folder`."""
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory) -> Path:
    """The digits at 32 px, prepared once for this module."""
    root = tmp_path_factory.mktemp("digits")
    prepare_digits(root)
    return root


def test_captions_name_the_number():
    assert (
        digit_caption(7) == "a photo of the digit seven" and digit_caption(0) == "a photo of the digit zero"
    )


def test_all_digits_with_matching_captions_labels_and_pixels(digits_root):
    train_urls, val_urls = prepare_digits(digits_root)
    assert (len(train_urls), len(val_urls)) == (8, 2)
    assert (train_urls, val_urls) == digits_urls(digits_root)  # predicted before writing
    data = load_digits()
    splits = {}
    for name, urls in (("train", train_urls), ("val", val_urls)):
        indices = []
        for s in samples(urls):
            meta = json.loads(s["json"])
            i, label = meta["index"], meta["label"]
            assert label == data.target[i] == int(s["cls"])
            assert s["txt"].decode() == meta["caption"] == f"a photo of the digit {WORDS[label]}"
            assert (meta["original_width"], meta["original_height"]) == (8, 8)
            img = Image.open(io.BytesIO(s["png"]))
            assert img.format == "PNG" and img.size == (32, 32)
            np.testing.assert_array_equal(np.asarray(img), np.asarray(digit_image(data.images[i], 32)))
            indices.append(i)
        splits[name] = indices
    assert sorted(splits["train"] + splits["val"]) == list(range(1797))  # each digit exactly once
    held_out = np.bincount(data.target[splits["val"]], minlength=10)
    assert len(splits["val"]) == 179 and held_out.min() >= 17 and held_out.max() <= 18  # stratified 10%


def test_digit_images_are_clean_upscales():
    data = load_digits()
    img = np.asarray(digit_image(data.images[0], 32))
    assert img.shape == (32, 32, 3) and (img[..., 0] == img[..., 2]).all()  # grey, as RGB
    np.testing.assert_array_equal(
        np.asarray(digit_image(data.images[0], 8))[..., 0], np.rint(data.images[0] * 255 / 16)
    )
    # Ink is white on black: the mean of an 8x8 block follows the source pixel it came from.
    blocks = img[..., 0].reshape(8, 4, 8, 4).mean(axis=(1, 3))
    assert np.corrcoef(blocks.ravel(), data.images[0].ravel())[0, 1] > 0.95


def test_prepare_is_idempotent_and_repairs(tmp_path):
    # 8 px: no resize, so this test writes fast; a second resolution gets its own folder.
    first = prepare_digits(tmp_path, resolution=8)
    before = mtimes(tmp_path)
    assert prepare_digits(tmp_path, resolution=8) == first
    assert mtimes(tmp_path) == before  # nothing rewritten
    Path(first[0][3]).unlink()  # a damaged set is written again
    assert prepare_digits(tmp_path, resolution=8) == first and Path(first[0][3]).is_file()
    assert mtimes(tmp_path) != before
    other = prepare_digits(tmp_path, resolution=8, val_fraction=0.2)  # other settings: rewritten in place
    assert sum(len(samples(u)) for u in other) == 1797 and len(samples(other[1])) > 300
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_datamodule_batches_follow_the_contract(digits_root):
    dm = DigitsDataModule(root=digits_root, resolution=32, batch_size=64, num_workers=0, seed=1)
    dm.prepare_data()
    n_train, keys = 0, set()
    for batch in dm.train_dataloader():
        n = len(batch["key"])
        assert batch["image"].shape == (n, 3, 32, 32) and batch["image"].dtype == torch.float32
        assert batch["image"].min() >= -1 and batch["image"].max() <= 1
        assert batch["original_size"].dtype == torch.long and (batch["original_size"] == 8).all()
        assert batch["crop_coords"].dtype == torch.long and (batch["crop_coords"] == 0).all()
        assert batch["label"].dtype == torch.long and batch["label"].shape == (n,)
        assert batch["caption"] == [digit_caption(int(y)) for y in batch["label"]]
        n_train += n
        keys.update(batch["key"])
    assert n_train == len(keys) == 1618 and not dm.skip_counts
    val = list(dm.val_dataloader())
    assert sum(len(b["key"]) for b in val) == 179 and not keys & {k for b in val for k in b["key"]}


def test_sample_photo_crops(tmp_path):
    urls = prepare_sample_photos(tmp_path, resolution=32, n=6, shard_size=4)
    assert len(urls) == 2
    captions = set()
    for s in samples(urls):
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.format == "JPEG" and img.size == (32, 32) and img.mode == "RGB"
        captions.add(s["txt"].decode())
    assert captions == {"a photo of a chinese pagoda by a lake", "a photo of an orange dahlia"}
    assert prepare_sample_photos(tmp_path, resolution=32, n=6, shard_size=4) == urls
    photos = {"a": Image.new("RGB", (40, 30), "red")}
    crops = random_crops(photos, 3, 16, seed=0)
    assert [c.size for _, c in crops] == [(16, 16)] * 3
    a = random_crops({"x": Image.linear_gradient("L").convert("RGB")}, 2, 16, seed=5)
    b = random_crops({"x": Image.linear_gradient("L").convert("RGB")}, 2, 16, seed=5)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for (_, x), (_, y) in zip(a, b))


def test_config_instantiates(digits_root):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    # Composed as train.yaml composes it: the run's `seed` and `paths.data_dir` sit at the root.
    data = OmegaConf.load(Path(__file__).parents[1] / "configs" / "data" / "digits.yaml")
    cfg = OmegaConf.create({"seed": 3, "paths": {"data_dir": str(digits_root.parent)}, "data": data})
    cfg.data.root = str(digits_root)
    dm = instantiate(cfg.data)
    assert isinstance(dm, DigitsDataModule) and (dm.batch_size, dm.num_workers, dm.seed) == (64, 0, 3)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (64, 3, 32, 32) and "label" in batch
    default = instantiate(
        OmegaConf.create({"seed": 0, "paths": {"data_dir": "/somewhere"}, "data": data}).data
    )
    assert default.sources[0][0] == "/somewhere/digits/32px/train/00000.tar"
