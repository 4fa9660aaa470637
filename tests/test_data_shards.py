"""The shard writer (ldm/data/shards.py): img2dataset layout, lossless round trips through the WebDataset
pipeline, resizing, broken files, atomic and repeatable writes, and the command line."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.data.shards import ShardWriter, key_digits, main, write_shards
from ldm.data.webdataset import WebDataModule
from tests.test_data_folder import make_folder, to_uint8

REPO = Path(__file__).resolve().parents[1]


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """key -> {suffix: bytes} of one tar, read with tarfile alone (not with the code under test)."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, suffix = member.name.split(".", 1)
            out.setdefault(key, {})[suffix] = tar.extractfile(member).read()
    return out


def read_all(paths: list[Path]) -> dict[str, dict[str, bytes]]:
    """Every sample of a list of shards."""
    return {k: v for p in paths for k, v in read_tar(p).items()}


@pytest.mark.parametrize(("fmt", "layout"), [("png", "txt"), ("keep", "jsonl"), ("png", "csv")])
def test_folder_to_shards_to_datamodule_is_lossless(tmp_path, fmt, layout):
    src = make_folder(tmp_path / "src", layout, n=5, size=(16, 16))
    paths = write_shards(tmp_path / "src", tmp_path / "out", shard_size=2, fmt=fmt)
    assert [p.name for p in paths] == ["00000.tar", "00001.tar", "00002.tar"]

    samples = read_all(paths)
    assert sorted(samples) == ["000000000", "000000001", "000010000", "000010001", "000020000"]
    by_source = {}
    for key, members in samples.items():
        assert set(members) == {"png", "txt", "json"}
        meta = json.loads(members["json"])
        assert meta["key"] == key and meta["status"] == "success" and meta["error_message"] is None
        assert (meta["width"], meta["height"], meta["original_width"], meta["original_height"]) == (16,) * 4
        assert meta["caption"] == members["txt"].decode() == src[meta["url"].rsplit(".", 1)[0]][1]
        assert meta["sha256"] == hashlib.sha256(members["png"]).hexdigest()
        by_source[key] = src[meta["url"].rsplit(".", 1)[0]]

    # The WebDataset pipeline gives back the same pixels and captions.
    dm = WebDataModule(
        [str(p) for p in paths],
        resolution=16,
        batch_size=2,
        num_workers=0,
        resampled=False,
        shuffle_buffer=0,
        random_flip=False,
    )
    seen = set()
    for batch in dm.train_dataloader():
        for key, image, caption in zip(batch["key"], batch["image"], batch["caption"]):
            arr, want = by_source[key]
            np.testing.assert_array_equal(to_uint8(image), arr)
            assert caption == want
            seen.add(key)
    assert seen == set(samples)

    for p in paths:  # an index and stats beside every tar, no temporary files left behind
        rows = [json.loads(line) for line in p.with_suffix(".jsonl").read_text().splitlines()]
        assert [r["key"] for r in rows] == sorted(read_tar(p))
        stats = json.loads(p.with_name(p.stem + "_stats.json").read_text())
        assert stats["count"] == stats["successes"] == len(rows)
    assert not [f for f in os.listdir(tmp_path / "out") if f.startswith(".")]


def test_resize_and_jpeg(tmp_path):
    # A smooth image (JPEG at q95 keeps it to within a grey level or two; random noise it would not).
    yy, xx = np.mgrid[0:40, 0:60]
    arr = np.stack([xx * 4, yy * 6, (xx + yy) * 2], axis=-1).clip(0, 255).astype(np.uint8)
    (tmp_path / "src").mkdir()
    Image.fromarray(arr).save(tmp_path / "src" / "smooth.png")
    (tmp_path / "src" / "smooth.txt").write_text("a gradient")
    paths = write_shards(tmp_path / "src", tmp_path / "out", 10, fmt="jpg", resize=20, quality=95)
    [members] = read_all(paths).values()
    meta = json.loads(members["json"])
    assert (meta["width"], meta["height"]) == (30, 20)  # short side 20, aspect kept
    assert (meta["original_width"], meta["original_height"]) == (60, 40)
    img = Image.open(io.BytesIO(members["jpg"]))
    assert img.format == "JPEG" and img.size == (30, 20)
    want = Image.fromarray(arr).resize((30, 20), Image.LANCZOS)
    assert np.abs(np.asarray(img, np.float64) - np.asarray(want, np.float64)).mean() < 2.0


def test_keep_copies_jpeg_bytes_and_png_turns_them_lossless(tmp_path):
    make_folder(tmp_path / "src", "txt", n=2, size=(16, 16), fmt="jpg")
    sources = {p.name: p.read_bytes() for p in (tmp_path / "src").rglob("*.jpg")}
    kept = read_all(write_shards(tmp_path / "src", tmp_path / "keep", 10, fmt="keep"))
    assert {m["jpg"] for m in kept.values()} == set(sources.values())  # no second lossy encoding
    png = read_all(write_shards(tmp_path / "src", tmp_path / "png", 10, fmt="png"))
    for members in png.values():
        name = json.loads(members["json"])["url"].rsplit("/", 1)[-1]
        decoded = np.asarray(Image.open(io.BytesIO(sources[name])).convert("RGB"))
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(members["png"]))), decoded)


def test_broken_images_get_failure_rows_and_no_members(tmp_path):
    make_folder(tmp_path / "src", "txt", n=3, size=(8, 8))
    (tmp_path / "src" / "img00_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    paths = write_shards(tmp_path / "src", tmp_path / "out", 10, fmt="png")
    rows = [json.loads(line) for line in paths[0].with_suffix(".jsonl").read_text().splitlines()]
    failed = [r for r in rows if r["status"] != "success"]
    assert len(rows) == 4 and len(failed) == 1 and failed[0]["url"] == "img00_broken.png"
    assert failed[0]["status"] == "failed_to_decode" and failed[0]["error_message"]
    assert failed[0]["key"] not in read_tar(paths[0]) and len(read_tar(paths[0])) == 3
    stats = json.loads((tmp_path / "out" / "00000_stats.json").read_text())
    assert (stats["count"], stats["successes"], stats["failed_to_decode"]) == (4, 3, 1)


def test_existing_shards_need_overwrite_and_stale_ones_go(tmp_path):
    make_folder(tmp_path / "src", "txt", n=4, size=(8, 8))
    assert len(write_shards(tmp_path / "src", tmp_path / "out", 1, fmt="png")) == 4
    with pytest.raises(FileExistsError):
        write_shards(tmp_path / "src", tmp_path / "out", 2, fmt="png")
    assert len(write_shards(tmp_path / "src", tmp_path / "out", 2, fmt="png", overwrite=True)) == 2
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert not (tmp_path / "out" / "00003_stats.json").exists()


def test_shards_are_byte_identical_across_runs(tmp_path):
    make_folder(tmp_path / "src", "txt", n=3, size=(8, 8))
    a = write_shards(tmp_path / "src", tmp_path / "a", 2, fmt="png")
    b = write_shards(tmp_path / "src", tmp_path / "b", 2, fmt="png")
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    shuffled = write_shards(tmp_path / "src", tmp_path / "c", 3, fmt="png", shuffle_seed=1)
    urls = [json.loads(m["json"])["url"] for m in read_tar(shuffled[0]).values()]
    assert urls != sorted(urls) and sorted(urls) == ["img00.png", "img02.png", "sub/img01.png"]


def test_writer_leaves_no_partial_shard_on_error(tmp_path):
    img = Image.new("RGB", (8, 8))
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, shard_size=2, fmt="png") as writer:
        for _ in range(3):
            writer.add_image(img, "x")  # the third opens shard 1
        raise RuntimeError("interrupted")
    # The completed shard 0 stays (with its index files); nothing of the interrupted shard 1 does.
    assert not [name for name in os.listdir(tmp_path) if name.startswith("00001") or ".tmp" in name]
    assert {"00000.jsonl", "00000.tar", "00000_stats.json"} <= set(os.listdir(tmp_path))


def test_key_digits_follow_img2dataset():
    # 5 shard digits + 4 index digits = 9-digit keys up to img2dataset's default 10,000 a shard.
    assert key_digits(10_000) == 4 and key_digits(2) == 4 and key_digits(10_001) == 5


def test_cli_writes_expected_files(tmp_path):
    make_folder(tmp_path / "src", "jsonl", n=3, size=(8, 8))
    cmd = [sys.executable, "-m", "ldm.data.shards", str(tmp_path / "src"), str(tmp_path / "out")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        cmd + ["--shard-size", "2", "--format", "png"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 2 shard(s), 3 image(s)" in result.stdout
    names = sorted(os.listdir(tmp_path / "out"))
    want = ["00000.jsonl", "00000.tar", "00000_stats.json", "00001.jsonl", "00001.tar", "00001_stats.json"]
    assert [n for n in names if not n.endswith(".parquet")] == want
    with pytest.raises(SystemExit):  # argparse refuses an unknown format (in-process: no second start-up)
        main([str(tmp_path / "src"), str(tmp_path / "bad"), "--format", "gif"])


def test_parquet_index_when_pyarrow_is_installed(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    make_folder(tmp_path / "src", "txt", n=2, size=(8, 8))
    paths = write_shards(tmp_path / "src", tmp_path / "out", 10, fmt="png")
    table = pq.read_table(paths[0].with_suffix(".parquet")).to_pylist()
    assert [r["key"] for r in table] == ["000000000", "000000001"] and table[0]["status"] == "success"
