"""WebDataModule: splitting across simulated ranks and real DataLoader workers, resampling, mixing,
transforms (crop coordinates, range), aspect-ratio bucketing, and the Hydra config."""

from __future__ import annotations

import io
import json
import random
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from ldm.data.bucketing import AspectBuckets, BucketBatcher, make_buckets
from ldm.data.transforms import ImageTransform, cover_size, to_tensor
from ldm.data.webdataset import WebDataModule, split_plan

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "data" / "webdataset.yaml"


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    """Image -> file bytes."""
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def write_shard(path: Path, samples: list[dict]) -> Path:
    """Write samples (member suffix -> bytes or str, plus "__key__") as one tar shard."""
    with wds.TarWriter(str(path), encoder=False) as sink:
        for sample in samples:
            sink.write(
                {k: v.encode() if isinstance(v, str) and k != "__key__" else v for k, v in sample.items()}
            )
    return path


def good_sample(key: str, w: int = 24, h: int = 20, **meta) -> dict:
    """A valid img2dataset-style sample with a random-colour PNG."""
    rng = np.random.default_rng(abs(hash(key)) % 2**32)
    img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    return {"__key__": key, "png": encode(img), "txt": f"a picture {key}", "json": json.dumps(meta)}


def write_dataset(root: Path, n_shards: int, per_shard: int, prefix: str = "") -> tuple[str, list[str]]:
    """`n_shards` shards of `per_shard` good samples; returns the brace pattern and all keys."""
    keys = []
    for s in range(n_shards):
        samples = [good_sample(f"{prefix}{s:05d}{i:04d}") for i in range(per_shard)]
        keys += [x["__key__"] for x in samples]
        write_shard(root / f"{prefix}{s:05d}.tar", samples)
    return str(root / f"{prefix}{{00000..{n_shards - 1:05d}}}.tar"), keys


def all_keys(loader) -> list[str]:
    """Every key of one pass over a loader."""
    return [k for batch in loader for k in batch["key"]]


# Finite epochs are what evaluation uses; on training loaders the module warns about uneven DDP ranks.
FINITE_DDP = pytest.mark.filterwarnings("ignore:finite training epochs under DDP")


@FINITE_DDP
@pytest.mark.parametrize("n_shards", [8, 3, 1])
def test_each_sample_once_across_2_ranks_x_2_workers(tmp_path, n_shards):
    """Finite mode: the union over ranks (real worker processes each) is every sample exactly once, for
    enough shards (split by shard), fewer than ranks x workers, and fewer than ranks (split by sample)."""
    urls, keys = write_dataset(tmp_path, n_shards, 24 // n_shards)
    seen, per_rank, val_seen = [], [], []
    for rank in range(2):
        dm = WebDataModule(
            urls, val_urls=urls, resolution=16, batch_size=4, num_workers=2, resampled=False,
            rank=rank, world_size=2,
        )  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loader, val_loader = dm.train_dataloader(), dm.val_dataloader()
        assert any("splitting by sample" in str(w.message) for w in caught) == (n_shards < 4)
        got = all_keys(loader)
        per_rank.append(len(got))
        seen += got
        val_seen += all_keys(val_loader)  # evaluation: finite, in order, same split
    assert sorted(seen) == sorted(keys) and sorted(val_seen) == sorted(keys)
    assert all(n > 0 for n in per_rank)  # no rank is left without data (webdataset #188)


def test_split_plan_partitions_every_sample():
    """split_plan covers each (shard, sample) exactly once for any shard / rank / worker counts."""
    for n_shards in (1, 2, 3, 5, 9):
        for world, workers in ((1, 1), (2, 2), (3, 2), (4, 3)):
            owners = Counter()
            for rank in range(world):
                for worker in range(workers):
                    for shard, mod, res in split_plan(n_shards, rank, world, worker, workers):
                        owners.update((shard, j) for j in range(7) if j % mod == res)
            assert sorted(owners) == [(s, j) for s in range(n_shards) for j in range(7)]
            assert set(owners.values()) == {1}


@FINITE_DDP
def test_rank_from_environment(tmp_path, monkeypatch):
    """Without a Trainer or process group, RANK / WORLD_SIZE (torchrun's variables) pick the split."""
    urls, keys = write_dataset(tmp_path, 4, 3)
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = WebDataModule(urls, resolution=16, batch_size=4, num_workers=0, resampled=False)
        got = all_keys(dm.train_dataloader())
        assert 0 < len(got) < len(keys)
        seen += got
    assert sorted(seen) == sorted(keys)


def test_resampled_ranks_draw_different_samples(tmp_path):
    """Resampled mode: ranks draw different shards (not webdataset's every-rank-the-same failure), a rank
    is reproducible from the seed, an epoch is exactly `epoch_steps` batches on every rank, and the next
    epoch continues the same stream."""
    urls, keys = write_dataset(tmp_path, 6, 4)

    def stream(rank: int, steps: int = 5, epochs: int = 2, workers: int = 2) -> list[list[str]]:
        # No shuffle buffer: the key order is the order of the drawn shards.
        dm = WebDataModule(
            urls, resolution=16, batch_size=4, num_workers=workers, shuffle_buffer=0, epoch_steps=steps,
            rank=rank, world_size=2,
        )  # fmt: skip
        loader = dm.train_dataloader()
        assert len(loader) == steps
        out = [all_keys(loader) for _ in range(epochs)]
        assert [len(e) for e in out] == [4 * steps] * epochs
        dm.teardown("fit")
        return out

    r0, r1 = stream(0), stream(1)
    shards = [[k[:5] for k in epoch[::4]] for epoch in (*r0, *r1)]  # a shard's 4 samples come in order
    assert shards[0] != shards[2] and shards[1] != shards[3]
    assert r0[0] != r0[1]
    assert stream(0) == r0
    assert set(r0[0]) <= set(keys)
    one_worker = stream(0, workers=0)
    assert stream(0, steps=10, epochs=1, workers=0) == [one_worker[0] + one_worker[1]]


def test_epoch_size_in_samples(tmp_path):
    """epoch_size counts samples over all ranks: 40 samples / (4 per batch x 2 ranks) = 5 steps."""
    urls, _ = write_dataset(tmp_path, 2, 4)
    dm = WebDataModule(urls, batch_size=4, num_workers=0, epoch_size=40, rank=0, world_size=2)
    assert len(dm.train_dataloader()) == 5
    with pytest.raises(ValueError):
        WebDataModule(urls, epoch_size=40, epoch_steps=5)


def test_pipe_urls(tmp_path):
    """`pipe:` URLs (e.g. `pipe:aws s3 cp s3://... -`) stream a command's stdout; braces expand inside."""
    write_dataset(tmp_path, 2, 3)
    dm = WebDataModule(
        f"pipe:cat {tmp_path}/{{00000..00001}}.tar", batch_size=2, num_workers=0, resampled=False
    )
    assert len(all_keys(dm.train_dataloader())) == 6


def test_mixing_by_weight(tmp_path):
    """Two sources with weights 0.8 / 0.2 are drawn in about that ratio; finite mixing reads both fully."""
    a, keys_a = write_dataset(tmp_path, 2, 8, prefix="a")
    b, keys_b = write_dataset(tmp_path, 2, 8, prefix="b")
    dm = WebDataModule(
        [a, b], weights=[0.8, 0.2], resolution=16, batch_size=10, num_workers=0, epoch_steps=40
    )
    got = all_keys(dm.train_dataloader())
    share_a = sum(k.startswith("a") for k in got) / len(got)
    assert 0.74 < share_a < 0.86, share_a
    dm = WebDataModule([a, [b]], weights=[1, 3], batch_size=5, num_workers=0, resampled=False)
    assert sorted(all_keys(dm.train_dataloader())) == sorted(keys_a + keys_b)


def test_transform_geometry_and_range():
    """Resize covers the target, crop_coords locate the crop in the resized (and mirrored) image, output
    is (3, H, W) in [-1, 1]."""
    rng_np = np.random.default_rng(0)
    img = Image.fromarray(rng_np.integers(0, 256, (30, 50, 3), dtype=np.uint8))  # w=50, h=30
    assert cover_size(50, 30, 16, 16) == (27, 16)
    out, (top, left) = ImageTransform(16, random_crop=False, random_flip=False)(img, random.Random(0))
    assert out.shape == (3, 16, 16) and (top, left) == (0, 6)  # round((27 - 16) / 2)
    assert out.min() >= -1 and out.max() <= 1
    black_white = Image.fromarray(np.repeat(np.array([[0, 255]], dtype=np.uint8), 3, 0)).convert("RGB")
    assert to_tensor(black_white)[:, :, 0].eq(-1).all() and to_tensor(black_white)[:, :, 1].eq(1).all()
    resized = img.resize((27, 16), Image.Resampling.LANCZOS)
    for seed in range(6):
        out, (top, left) = ImageTransform(16, random_crop=True, random_flip=True)(img, random.Random(seed))
        flipped = not torch.equal(out, to_tensor(resized.crop((left, top, left + 16, top + 16))))
        base = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flipped else resized
        assert torch.equal(out, to_tensor(base.crop((left, top, left + 16, top + 16))))
    # a bucket target (h, w) = (16, 24): cover size 27 x 16 again, crop 24 wide
    out, (top, left) = ImageTransform(16, random_flip=False)(img, random.Random(0), (16, 24))
    assert out.shape == (3, 16, 24) and (top, left) == (0, 2)


def test_batch_contract_and_original_size(tmp_path):
    """Batches hold the contract's keys and dtypes; original_size comes from img2dataset's json when it
    is there, else the stored image; labels from `{key}.cls`."""
    samples = [good_sample("k0", 40, 20, original_width=400, original_height=200), good_sample("k1", 20, 40)]
    for i, s in enumerate(samples):
        s["cls"] = str(i + 3)
    urls = str(write_shard(tmp_path / "s.tar", samples))
    dm = WebDataModule(
        urls, resolution=16, batch_size=2, num_workers=0, resampled=False, random_flip=False, label_key="cls"
    )
    (batch,) = list(dm.train_dataloader())
    order = [batch["key"].index(k) for k in ("k0", "k1")]
    assert batch["image"].shape == (2, 3, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["original_size"].dtype == torch.long and batch["crop_coords"].dtype == torch.long
    assert batch["original_size"][order].tolist() == [[200, 400], [40, 20]]
    assert batch["crop_coords"][order].tolist() == [[0, 8], [8, 0]]  # 32x16 -> left 8; 16x32 -> top 8
    assert batch["label"][order].tolist() == [3, 4]
    assert batch["caption"][order[0]] == "a picture k0"


def test_buckets_shape():
    """make_buckets: multiples of the step, area within resolution^2, both orientations, square kept."""
    buckets = make_buckets(512)
    assert (512, 512) in buckets and (384, 640) in buckets and (640, 384) in buckets
    assert all(h % 64 == 0 and w % 64 == 0 and h * w <= 512 * 512 for h, w in buckets)
    assert all(256 <= h <= 1024 and 256 <= w <= 1024 for h, w in buckets)
    assert AspectBuckets(buckets).nearest(1920, 1080) == (384, 640)  # 16:9 -> 5:3
    assert AspectBuckets(buckets).nearest(1080, 1920) == (640, 384)
    assert AspectBuckets(buckets).nearest(1000, 1000) == (512, 512)
    batcher = BucketBatcher(2)
    assert batcher.add((1, 2), "a") is None and batcher.add((2, 1), "b") is None
    assert batcher.add((1, 2), "c") == ["a", "c"] and list(batcher.flush()) == [["b"]]


def test_bucketed_batches_are_homogeneous(tmp_path):
    """With bucketing every image lands in its nearest-aspect bucket and each batch is one bucket."""
    shapes = [(48, 24), (24, 48), (32, 32), (40, 30), (30, 40), (64, 16)]  # (w, h)
    samples = [good_sample(f"{w}x{h}-{i}", w, h) for i in range(5) for w, h in shapes]
    urls = str(write_shard(tmp_path / "b.tar", samples))
    dm = WebDataModule(
        urls,
        resolution=32,
        batch_size=4,
        num_workers=0,
        resampled=False,
        bucketing={"step": 8},
        random_flip=False,
    )
    buckets = AspectBuckets(make_buckets(32, step=8))
    seen = []
    for batch in dm.train_dataloader():
        h, w = batch["image"].shape[-2:]
        for key in batch["key"]:
            sw, sh = map(int, key.split("-")[0].split("x"))
            assert buckets.nearest(sw, sh) == (h, w), key
        seen += batch["key"]
    assert sorted(seen) == sorted(s["__key__"] for s in samples)
    assert len({buckets.nearest(w, h) for w, h in shapes}) >= 4  # the shapes really use several buckets


def test_hydra_config(tmp_path):
    """configs/data/webdataset.yaml composes with a `urls=` override and instantiates to a working module."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    urls, keys = write_dataset(tmp_path, 2, 3)
    with initialize_config_dir(config_dir=str(CONFIG.parents[1]), version_base="1.3"):
        cfg = compose(
            config_name="data/webdataset",
            overrides=[f"data.urls='{urls}'", "data.batch_size=2", "data.num_workers=0", "data.resolution=16"]
            + ["data.filters.min_size=8"],
        )
    dm = instantiate(cfg.data)
    assert isinstance(dm, WebDataModule) and dm.batch_size == 2 and dm.filters.min_size == 8
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 16, 16) and set(batch["key"]) <= set(keys)
