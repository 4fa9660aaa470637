"""Broken and odd samples: every kind is converted or skipped and counted by reason, nothing crashes, and
the counts cross from DataLoader workers to the DataModule."""

from __future__ import annotations

import io
import json
import random
import struct
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.filters import FilterConfig, check_metadata
from ldm.data.stats import SKIP_REASONS, SkipCounter, skip_log_dict
from ldm.data.transforms import UnsupportedModeError, to_rgb
from ldm.data.webdataset import STATS_ONLY, WebDataModule, read_shard
from tests.test_data_webdataset import encode, good_sample, write_shard

S = 24  # image side = resolution, so pixels pass through unresized and can be compared exactly
FILTERS = {
    "min_size": 8,
    "max_pixels": 48 * 48,
    "max_aspect_ratio": 2.0,
    "max_caption_length": 100,
    "punsafe_max": 0.5,
    "pwatermark_max": 0.5,
    "similarity_min": 0.25,
    "metadata_min": {"aesthetic": 5.0},
}


def sample(
    key: str, image: bytes | None, caption: str | None = "a caption", meta: dict | None = None
) -> dict:
    """An img2dataset-style sample; the image member is always called .png (PIL reads by content)."""
    out: dict = {"__key__": key}
    if image is not None:
        out["png"] = image
    if caption is not None:
        out["txt"] = caption
    out["json"] = json.dumps(meta or {"similarity": 0.3, "punsafe": 0.1, "pwatermark": 0.1})
    return out


def halves(mode: str, left, right, size: int = S) -> Image.Image:
    """An image in `mode` whose left and right halves have the given pixel values."""
    img = Image.new(mode, (size, size), left)
    img.paste(Image.new(mode, (size // 2, size), right), (size // 2, 0))
    return img


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (PIL refuses it on open)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


def exif_rotated_jpeg() -> bytes:
    """A 32 x 16 (w x h) JPEG whose EXIF says "rotate 90 degrees": it is displayed 16 wide, 32 high."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.new("RGB", (32, 16), (0, 128, 0)).save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


def palette_with_transparency() -> bytes:
    """P image: left half index 0 (transparent), right half index 1 (red)."""
    img = halves("P", 0, 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    buf = io.BytesIO()
    img.save(buf, "PNG", transparency=0)
    return buf.getvalue()


# key -> (raw sample, expected RGB of the left half, of the right half) for samples that must come through
CONVERTED = {
    "cmyk": (encode(Image.new("CMYK", (S, S), (0, 255, 0, 0)), "JPEG"), (255, 0, 255), (255, 0, 255)),
    "palette": (encode(Image.new("RGB", (S, S), (255, 0, 0)).convert("P")), (255, 0, 0), (255, 0, 0)),
    "palette_alpha": (palette_with_transparency(), (255, 255, 255), (255, 0, 0)),
    "gray16": (encode(halves("I;16", 0, 257 * 100)), (0, 0, 0), (100, 100, 100)),
    "rgba": (encode(halves("RGBA", (0, 0, 0, 0), (0, 0, 255, 255))), (255, 255, 255), (0, 0, 255)),
    "la": (encode(halves("LA", (0, 0), (0, 255))), (255, 255, 255), (0, 0, 0)),
    "bilevel": (encode(halves("1", 0, 1)), (0, 0, 0), (255, 255, 255)),
    "webp": (encode(Image.new("RGB", (S, S), (0, 0, 255)), "WEBP"), (0, 0, 255), (0, 0, 255)),
}
RGB = encode(Image.new("RGB", (S, S), (10, 200, 10)))
# key -> (raw sample pieces, reason it must be skipped for)
BROKEN = {
    "truncated": (sample("truncated", encode(Image.new("RGB", (S, S)), "JPEG")[:200]), "decode_error"),
    "not_image": (sample("not_image", b"<html>404 Not Found</html>"), "decode_error"),
    "empty_bytes": (sample("empty_bytes", b""), "decode_error"),
    "no_image": (sample("no_image", None), "missing_image"),
    "no_caption": (sample("no_caption", RGB, caption=None), "missing_caption"),
    "empty_caption": (sample("empty_caption", RGB, caption="  \n"), "empty_caption"),
    "long_caption": (sample("long_caption", RGB, caption="x" * 101), "caption_length"),
    "bad_json": ({**sample("bad_json", RGB), "json": "{not json"}, "bad_metadata"),
    "unsafe": (sample("unsafe", RGB, meta={"punsafe": 0.9}), "unsafe"),
    "watermark": (sample("watermark", RGB, meta={"pwatermark": 0.8}), "watermark"),
    "low_similarity": (sample("low_similarity", RGB, meta={"similarity": 0.1}), "similarity"),
    "low_aesthetic": (sample("low_aesthetic", RGB, meta={"aesthetic": 3.0}), "metadata"),
    "tiny": (sample("tiny", encode(Image.new("RGB", (4, 4)))), "too_small"),
    "huge": (sample("huge", encode(Image.new("RGB", (64, 64)))), "too_large"),
    "bomb": (sample("bomb", bomb_png(30000, 30000)), "too_large"),  # over 2x PIL's MAX_IMAGE_PIXELS
    "wide": (sample("wide", encode(Image.new("RGB", (3 * 16, 16)))), "aspect_ratio"),
}


def write_broken_dataset(root: Path) -> tuple[str, set[str]]:
    """Two shards mixing good, convertible and broken samples, and a third cut off inside its last image."""
    good = [
        good_sample("good_png", S, S),
        sample("good_jpg", encode(Image.new("RGB", (S, S), (1, 2, 3)), "JPEG")),
        sample("exif", exif_rotated_jpeg(), meta={"similarity": 0.3, "caption": "unused, .txt wins"}),
        sample("caption_in_json", RGB, caption=None, meta={"caption": "from the json"}),
        sample("no_metadata", RGB) | {"json": "{}"},
    ]
    good += [sample(key, raw) for key, (raw, _, _) in CONVERTED.items()]
    samples = good + [s for s, _ in BROKEN.values()]
    random.Random(0).shuffle(samples)
    write_shard(root / "00000.tar", samples[::2])
    write_shard(root / "00001.tar", samples[1::2])
    # t2's members sort png < txt: the cut leaves a partial png and no caption
    third = [good_sample("t0", S, S), good_sample("t1", S, S), {"__key__": "t2", "png": RGB, "txt": "cut"}]
    path = write_shard(root / "00002.tar", third)
    with tarfile.open(path) as tar:
        cut = tar.getmember("t2.png").offset_data + 100
    path.write_bytes(path.read_bytes()[:cut])
    return str(root / "{00000..00002}.tar"), {s["__key__"] for s in good} | {"t0", "t1"}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_one_pass_yields_exactly_the_good_samples(tmp_path, num_workers):
    """Good and convertible samples come through once; every broken one is skipped and counted under its
    reason, in batch["skipped"] and in datamodule.skip_counts, across worker processes."""
    urls, good_keys = write_broken_dataset(tmp_path)
    dm = WebDataModule(
        urls,
        resolution=S,
        batch_size=4,
        num_workers=num_workers,
        resampled=False,
        random_flip=False,
        filters=FILTERS,
    )
    batches = list(dm.train_dataloader())
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == sorted(good_keys)
    expected = Counter(reason for _, reason in BROKEN.values())
    from_batches = Counter()
    for b in batches:
        from_batches.update(b["skipped"])
    expected["shard_error"] = 1  # the truncated third shard ...
    expected["missing_caption"] += 1  # ... and what arrived of its last sample
    assert dict(dm.skip_counts) == dict(expected)
    # The loader shows only batches; counts after a worker's last batch travel in a stats-only item.
    assert from_batches.total() <= dm.skip_counts.total()
    items = list(dm.train_dataloader().dataset)  # the raw stream, in this process
    assert sum((Counter(item["skipped"]) for item in items), Counter()) == expected
    assert all(STATS_ONLY in item for item in items if "image" not in item)
    assert set(dm.skip_counts) <= set(SKIP_REASONS)
    log = skip_log_dict(dm.skip_counts)
    assert log["data/skipped/total"] == dm.skip_counts.total() and log["data/skipped/unsafe"] == 1.0


def test_only_broken_samples_still_report_counts(tmp_path):
    """A worker whose data is all broken yields no batch; its counts still reach skip_counts."""
    urls = str(write_shard(tmp_path / "bad.tar", [s for s, _ in BROKEN.values()]))
    dm = WebDataModule(urls, resolution=S, batch_size=4, num_workers=1, resampled=False, filters=FILTERS)
    assert list(dm.train_dataloader()) == []
    assert dm.skip_counts == Counter(reason for _, reason in BROKEN.values())


def test_truncated_shard_counts_once(tmp_path):
    """A shard cut off inside a member raises at several levels of the tar reader; it counts as one
    shard_error, and the samples before the cut are kept."""
    samples = [good_sample(f"t{i}", S, S) for i in range(3)]
    path = write_shard(tmp_path / "cut.tar", samples)
    with tarfile.open(path) as tar:
        cut = tar.getmember("t2.png").offset_data + 100
    path.write_bytes(path.read_bytes()[:cut])
    counter = SkipCounter()
    got = list(read_shard(str(path), counter))
    assert [s["__key__"] for s in got[:2]] == ["t0", "t1"] and "txt" not in got[-1]
    assert counter.total == {"shard_error": 1}


def test_odd_modes_convert_to_correct_rgb(tmp_path):
    """CMYK, palette (with and without transparency), 16-bit, RGBA, LA, 1-bit and WebP arrive as the right
    RGB colours (alpha composited on white); EXIF rotation and json captions are honoured."""
    urls, _ = write_broken_dataset(tmp_path)
    dm = WebDataModule(urls, resolution=S, batch_size=64, num_workers=0, resampled=False, random_flip=False)
    (batch,) = [b for b in dm.train_dataloader() if "cmyk" in b["key"]]
    images = dict(zip(batch["key"], batch["image"]))
    for key, (_, left, right) in CONVERTED.items():
        img = images[key]
        assert img.shape == (3, S, S) and img.min() >= -1 and img.max() <= 1
        rgb = ((img + 1) * 127.5).round()
        tol = 6 if key == "cmyk" else 1  # JPEG chroma rounding
        for half, want in ((rgb[:, :, : S // 2 - 1], left), (rgb[:, :, S // 2 + 1 :], right)):
            got = half.mean(dim=(1, 2))
            assert torch.allclose(got, torch.tensor(want, dtype=got.dtype), atol=tol), (key, got, want)
    i = batch["key"].index("exif")
    assert batch["original_size"][i].tolist() == [32, 16]  # displayed (h, w) after the EXIF rotation
    assert batch["crop_coords"][i].tolist() == [12, 0]  # 16x32 covers 24x24 as 24x48: top (48 - 24) / 2
    assert batch["caption"][batch["key"].index("caption_in_json")] == "from the json"


def test_to_rgb_edge_modes():
    """32-bit integer and float grayscale are rescaled; a mode with no conversion raises (and the
    pipeline counts it as "unsupported_mode")."""
    i32 = Image.fromarray(np.full((2, 2), 65535, dtype=np.int32), mode="I")
    assert to_rgb(i32).getpixel((0, 0)) == (255, 255, 255)
    f32 = Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32), mode="F")
    assert to_rgb(f32).getpixel((0, 0)) == (128, 128, 128)

    class Odd:
        mode = "XYZ"
        info: dict = {}

        def convert(self, mode):
            raise ValueError("conversion not supported")

    with pytest.raises(UnsupportedModeError):
        to_rgb(Odd())


def test_filter_config():
    """Unknown filter keys are an error; thresholds on fields a sample lacks let it through."""
    with pytest.raises(ValueError, match="punsafe"):
        FilterConfig.from_dict({"punsafe": 0.5})
    cfg = FilterConfig.from_dict({"punsafe_max": 0.5, "metadata_max": {"nsfw": 0.3}})
    assert check_metadata({}, cfg) is None and check_metadata({"punsafe": None}, cfg) is None
    assert check_metadata({"punsafe": 0.6}, cfg) == "unsafe"
    assert check_metadata({"nsfw": 0.4}, cfg) == "metadata" and check_metadata({"nsfw": 0.2}, cfg) is None
