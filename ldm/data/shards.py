"""Write WebDataset shards in img2dataset's layout, from an image folder or from images in memory.

    python -m ldm.data.shards SRC OUT --shard-size 10000 [--format jpg|png|keep] [--resize 512]

Each shard `{shard:05d}.tar` holds, per sample, `{key}.jpg` (or `.png`), `{key}.txt` (caption) and
`{key}.json` (key, url, caption, width, height, original_width, original_height, status, error_message,
sha256, plus any extra metadata such as a label); keys are the shard id (5 digits) followed by the
index in the shard (4 digits up to 10,000 a shard, more beyond), as img2dataset writes them
(rom1504/img2dataset `compute_key`). Beside each tar:

- `{shard:05d}.jsonl`: the index, one row per source image with its status ("success" or
  "failed_to_decode" with the error), always written (pyarrow is not a dependency);
- `{shard:05d}.parquet`: the same table, also written when pyarrow is installed (img2dataset's format);
- `{shard:05d}_stats.json`: count, successes, failures by status, timing.

"url" is the source file's path relative to SRC (img2dataset's source URL). Every file is written to a
temporary name and renamed when complete, tar last, so a `*.tar` that exists is whole and has its index.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import os
import random
import tarfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from ldm.data.folder import scan_folder
from ldm.data.transforms import ImageDecodeError, UnsupportedModeError, load_rgb, open_image

log = logging.getLogger(__name__)

FORMATS = ("jpg", "png", "keep")
_PIL_FORMAT = {"jpg": "JPEG", "png": "PNG"}
_SHARD_FILE_SUFFIXES = (".tar", ".jsonl", ".parquet", "_stats.json")


def key_digits(shard_size: int) -> int:
    """Digits of the in-shard index: 4 for up to 10,000 samples a shard (9-digit keys, img2dataset's
    default), more for larger shards so keys stay unique."""
    return max(4, math.ceil(math.log10(max(shard_size, 2))))


def resize_short_side(img: Image.Image, size: int) -> Image.Image:
    """Shrink so the short side is `size`, keeping the aspect ratio; smaller images are left alone
    (enlarging stored images only costs space, the training transform resizes anyway). PIL's Lanczos
    widens its kernel with the scale factor, so shrinking is antialiased."""
    w, h = img.size
    if min(w, h) <= size:
        return img
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    return img.resize(new, Image.Resampling.LANCZOS)


def encode_image(img: Image.Image, fmt: str, quality: int = 95) -> tuple[bytes, str]:
    """(bytes, extension) of an RGB image as JPEG (4:2:0 chroma, as most web images) or PNG."""
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, format="JPEG", quality=quality)
    else:
        img.save(buf, format="PNG", compress_level=6)  # zlib's default: near the smallest, still fast
    return buf.getvalue(), fmt


def _target_format(fmt: str, source_format: str | None) -> str:
    """jpg / png for the written image: `keep` stores JPEG sources as JPEG and every other source
    (PNG, WebP, BMP, ...) as lossless PNG."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if fmt != "keep":
        return fmt
    return "jpg" if source_format == "JPEG" else "png"


def _is_upright(img: Image.Image) -> bool:
    """True when the EXIF orientation is absent or 1 (a broken EXIF block counts as not upright, so the
    image is re-encoded from what `load_rgb` makes of it)."""
    try:
        return int(img.getexif().get(0x0112, 1)) == 1
    except Exception:
        return False


def _atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_parquet(path: Path, rows: list[dict[str, Any]]) -> bool:
    """The index as parquet when pyarrow is installed (it is optional); True when written."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return False
    tmp = path.with_name(f".{path.name}.tmp")
    columns = ("key", "url", "caption", "status", "error_message", "width", "height")
    columns += ("original_width", "original_height", "sha256")
    pq.write_table(pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows]), tmp)
    os.replace(tmp, path)
    return True


class ShardWriter:
    """Writes samples into numbered shards of `shard_size` source images each (a failed image takes
    its key and an index row, as in img2dataset, but no tar members).

    Use as a context manager: leaving it normally closes the last shard; leaving on an exception
    removes the unfinished shard's temporary file, so no partial shard is ever visible.
    """

    def __init__(
        self,
        out: str | Path,
        shard_size: int = 10_000,
        *,
        fmt: str = "jpg",
        quality: int = 95,
        resize: int | None = None,
        start_shard: int = 0,
    ) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        _target_format(fmt, None)  # validates fmt
        self.out, self.shard_size = Path(out), shard_size
        self.fmt, self.quality, self.resize = fmt, quality, resize
        self.out.mkdir(parents=True, exist_ok=True)
        self.shard, self.index, self.digits = start_shard, 0, key_digits(shard_size)
        self.paths: list[Path] = []
        self.status: Counter[str] = Counter()  # over all shards
        self._tar: tarfile.TarFile | None = None
        self._rows: list[dict[str, Any]] = []
        self._started = 0.0

    # -- shard lifecycle -------------------------------------------------------------------------------
    def _name(self, suffix: str) -> Path:
        """Path of the current shard's file with `suffix`."""
        return self.out / f"{self.shard:05d}{suffix}"

    def _open(self) -> None:
        """Start the current shard's temporary tar."""
        tmp = self._name(".tar").with_name(f".{self.shard:05d}.tar.tmp")
        self._tar = tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT)
        self._rows, self._started = [], time.time()

    def _finish(self) -> None:
        """Write the index and stats, then rename the tar into place; move on to the next shard."""
        assert self._tar is not None
        tmp = Path(self._tar.name)
        self._tar.close()
        self._tar = None
        rows = self._rows
        _atomic_write(self._name(".jsonl"), "".join(json.dumps(r) + "\n" for r in rows).encode())
        _write_parquet(self._name(".parquet"), rows)
        status = Counter(r["status"] for r in rows)
        stats = {
            "count": len(rows),
            "successes": status["success"],
            "failed_to_decode": status["failed_to_decode"],
            "status_dict": dict(status),
            "format": self.fmt,
            "resize": self.resize,
            "start_time": self._started,
            "end_time": time.time(),
            "duration": time.time() - self._started,
        }
        _atomic_write(self._name("_stats.json"), json.dumps(stats, indent=2).encode())
        os.replace(tmp, self._name(".tar"))
        self.paths.append(self._name(".tar"))
        self.shard, self.index = self.shard + 1, 0

    def close(self) -> list[Path]:
        """Finish the last shard; the paths of all tars written."""
        if self._tar is not None:
            self._finish()
        return self.paths

    def abort(self) -> None:
        """Drop the unfinished shard (its tar was never renamed, so nothing partial is visible)."""
        if self._tar is not None:
            tmp = Path(self._tar.name)
            self._tar.close()
            self._tar = None
            tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        """The writer itself."""
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        """Close on success, abort on an exception (which then propagates)."""
        if exc_type is not None:
            self.abort()
        else:
            self.close()

    # -- samples ---------------------------------------------------------------------------------------
    def _next_key(self) -> str:
        """Open a shard if needed and assign the next key (shard id + index in shard)."""
        if self._tar is None:
            self._open()
        key = f"{self.shard:05d}{self.index:0{self.digits}d}"
        self.index += 1
        return key

    def _member(self, name: str, data: bytes) -> None:
        """Append one file to the tar; mtime 0 and fixed owners make identical inputs give identical
        shards (handy for caching and for checking a rewrite changed nothing)."""
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        self._tar.addfile(info, io.BytesIO(data))

    def _row_done(self) -> None:
        """Close the shard once it holds `shard_size` source images."""
        if self.index >= self.shard_size:
            self._finish()

    def add_encoded(
        self,
        data: bytes,
        ext: str,
        caption: str,
        size: tuple[int, int],
        *,
        original_size: tuple[int, int] | None = None,
        meta: dict[str, Any] | None = None,
        extra: dict[str, bytes] | None = None,
        url: str | None = None,
    ) -> str:
        """Store already encoded image bytes (`size` = (width, height) of the stored image, original_size
        likewise before any resize); `meta` joins the .json, `extra` adds members such as {"cls": b"7"}.
        Returns the key."""
        key = self._next_key()
        ow, oh = original_size or size
        row = {
            "key": key,
            "url": url,
            "caption": caption,
            "status": "success",
            "error_message": None,
            "width": size[0],
            "height": size[1],
            "original_width": ow,
            "original_height": oh,
            "sha256": hashlib.sha256(data).hexdigest(),
            **(meta or {}),
        }
        self._member(f"{key}.{ext}", data)
        self._member(f"{key}.txt", caption.encode("utf-8"))
        self._member(f"{key}.json", json.dumps(row).encode("utf-8"))
        for suffix, payload in (extra or {}).items():
            self._member(f"{key}.{suffix}", payload)
        self._rows.append(row)
        self.status["success"] += 1
        self._row_done()
        return key

    def add_image(
        self,
        img: Image.Image,
        caption: str,
        *,
        original_size: tuple[int, int] | None = None,
        meta: dict[str, Any] | None = None,
        extra: dict[str, bytes] | None = None,
        url: str | None = None,
    ) -> str:
        """Resize (when configured) and encode an RGB image, then store it. Returns the key."""
        original_size = original_size or img.size
        if self.resize:
            img = resize_short_side(img, self.resize)
        fmt = "png" if self.fmt == "keep" else self.fmt  # an in-memory image has no source format
        data, ext = encode_image(img, fmt, self.quality)
        return self.add_encoded(
            data, ext, caption, img.size, original_size=original_size, meta=meta, extra=extra, url=url
        )

    def add_failure(self, error: str, *, url: str | None = None, caption: str = "") -> str:
        """Record a source image that could not be read: a key and an index row, no tar members."""
        key = self._next_key()
        row = {"key": key, "url": url, "caption": caption, "status": "failed_to_decode"}
        row["error_message"] = error
        row.update(dict.fromkeys(("width", "height", "original_width", "original_height", "sha256")))
        self._rows.append(row)
        self.status["failed_to_decode"] += 1
        self._row_done()
        return key

    def add_file(self, path: str | Path, caption: str, *, url: str | None = None, **kw: Any) -> str:
        """Store an image file. Its bytes are copied unchanged when nothing needs to change (same format,
        RGB or grey, upright, no resize), which spares a JPEG a second lossy encoding; otherwise it is
        decoded to upright RGB and re-encoded. An unreadable file becomes a failure row."""
        path = Path(path)
        try:
            raw = path.read_bytes()
            img = open_image(raw)
            source_format, mode = img.format, img.mode
            upright = _is_upright(img)
            rgb = load_rgb(img)
        except (OSError, ImageDecodeError, UnsupportedModeError, Image.DecompressionBombError) as exn:
            log.warning("skipping %s: %s", path, exn)
            return self.add_failure(str(exn), url=url, caption=caption)
        target = _target_format(self.fmt, source_format)
        resized = self.resize is not None and min(rgb.size) > self.resize
        unchanged = source_format == _PIL_FORMAT[target] and mode in ("RGB", "L") and upright
        if unchanged and not resized:
            return self.add_encoded(raw, target, caption, rgb.size, url=url, **kw)
        original_size = rgb.size
        if resized:
            rgb = resize_short_side(rgb, self.resize)
        data, ext = encode_image(rgb, target, self.quality)
        return self.add_encoded(data, ext, caption, rgb.size, original_size=original_size, url=url, **kw)


def clear_shards(out: Path) -> int:
    """Remove the shard files (`NNNNN.tar`, `.jsonl`, `.parquet`, `_stats.json`) of a previous run."""
    n = 0
    for path in out.iterdir():
        stem = path.name[:5]
        if stem.isdigit() and path.name[5:] in _SHARD_FILE_SUFFIXES:
            path.unlink()
            n += 1
    return n


def write_shards(
    src: str | Path,
    out: str | Path,
    shard_size: int = 10_000,
    *,
    fmt: str = "jpg",
    quality: int = 95,
    resize: int | None = None,
    caption_column: str = "text",
    image_column: str = "file_name",
    shuffle_seed: int | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Turn an image folder (`.txt` captions or metadata.jsonl / .csv; see `ldm.data.folder`) into
    shards in `out`; returns the tar paths. Images go in key order, or in a seeded random order with
    `shuffle_seed` (so a class-sorted folder does not give class-sorted shards). `out` must hold no
    shards unless `overwrite`, which deletes them first (stale shards would be read with the new ones)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("[0-9][0-9][0-9][0-9][0-9].tar")):
        if not overwrite:
            raise FileExistsError(f"{out} already holds shards; pass overwrite=True (--overwrite)")
        clear_shards(out)
    missing: Counter[str] = Counter()
    items = scan_folder(src, caption_column, image_column, missing)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(items)
    with ShardWriter(out, shard_size, fmt=fmt, quality=quality, resize=resize) as writer:
        for item in items:
            # A list of captions (jsonl) stores the first as the caption and all of them in the .json.
            caption = item.caption[0] if isinstance(item.caption, tuple) else item.caption
            meta = {"captions": list(item.caption)} if isinstance(item.caption, tuple) else None
            url = item.path.relative_to(Path(src)).as_posix()
            writer.add_file(item.path, caption, url=url, meta=meta)
    failed = writer.status["failed_to_decode"]
    if failed or missing:
        log.warning("%s: %d unreadable image(s) skipped, %d missing", src, failed, sum(missing.values()))
    return writer.paths


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Command line: `python -m ldm.data.shards SRC OUT --shard-size N ...`."""
    p = argparse.ArgumentParser(prog="python -m ldm.data.shards", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="image folder (.txt captions, or metadata.jsonl / metadata.csv)")
    p.add_argument("out", help="output folder for NNNNN.tar / .jsonl / _stats.json")
    p.add_argument("--shard-size", type=int, default=10_000, help="source images per shard")
    p.add_argument("--format", choices=FORMATS, default="jpg", help="keep: JPEG stays JPEG, rest PNG")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality")
    p.add_argument("--resize", type=int, default=None, help="shrink the short side to N (antialiased)")
    p.add_argument("--caption-column", default="text")
    p.add_argument("--image-column", default="file_name")
    p.add_argument("--shuffle-seed", type=int, default=None, help="shuffle images before sharding")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    options = {k: v for k, v in vars(a).items() if k not in ("src", "out", "shard_size", "format")}
    paths = write_shards(a.src, a.out, a.shard_size, fmt=a.format, **options)
    n = sum(json.loads(p.with_name(p.stem + "_stats.json").read_text())["successes"] for p in paths)
    print(f"wrote {len(paths)} shard(s), {n} image(s) to {a.out}")
    return paths


if __name__ == "__main__":
    main()
