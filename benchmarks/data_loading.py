"""Data loading throughput: our WebDataset shard pipeline against PIL decoding the same JPEGs in a loop.

    python benchmarks/data_loading.py [--n 1024] [--resolution 256] [--batch-size 32] [--workers 0 1 2]

Writes `n` JPEGs (quality 95) of `resolution` pixels, random crops of scikit-learn's two sample photos,
to a folder with captions, turns the folder into shards with `write_shards(..., fmt="keep")` (the JPEG
bytes are copied, so both paths decode identical files), then times one full pass of:

- shards: `WebDataModule` (finite, shuffle buffer, random crop + flip, collate), for each worker count;
- folder: `FolderDataModule` on the same folder (map-style Dataset), for each worker count;
- PIL loop: read file, decode to RGB, the same `ImageTransform`, stack batches, in the main process.

torch runs one thread in the main process (`torch.set_num_threads(1)`) and DataLoader workers use one
each (PyTorch sets that in every worker), so the numbers measure decoding and augmentation per core,
not how many threads torch's ops could spread over. Each figure is the best of `--repeats` passes and
includes starting the workers, as a training epoch does. Numbers go to stdout as a table.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: one thread per process

import torch  # noqa: E402

from ldm.data.digits import load_sample_photos, random_crops  # noqa: E402
from ldm.data.folder import FolderDataModule  # noqa: E402
from ldm.data.shards import write_shards  # noqa: E402
from ldm.data.transforms import ImageTransform, load_rgb, open_image  # noqa: E402
from ldm.data.webdataset import WebDataModule  # noqa: E402


def write_jpegs(folder: Path, n: int, resolution: int, seed: int = 0) -> list[Path]:
    """`n` JPEG crops of the sample photos, each with a `.txt` caption; returns the image paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (name, img) in enumerate(random_crops(load_sample_photos(), n, resolution, seed)):
        path = folder / f"{i:06d}.jpg"
        img.save(path, quality=95)
        path.with_suffix(".txt").write_text(f"a photo of the {name} picture")
        paths.append(path)
    return paths


def pil_loop(paths: list[Path], resolution: int, batch_size: int) -> Iterable[torch.Tensor]:
    """The baseline: decode and transform each file in the main process, stacking batches."""
    transform, rng = ImageTransform(resolution, random_crop=True, random_flip=True), random.Random(0)
    batch = []
    for path in paths:
        image, _ = transform(load_rgb(open_image(path.read_bytes())), rng)
        batch.append(image)
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)


def time_pass(make: Callable[[], Iterable], repeats: int) -> tuple[float, int]:
    """(best images/s, images) over `repeats` full passes of a fresh iterable."""
    best, count = 0.0, 0
    for _ in range(repeats):
        start, count = time.perf_counter(), 0
        for batch in make():
            count += len(batch["key"]) if isinstance(batch, dict) else len(batch)
        best = max(best, count / (time.perf_counter() - start))
    return best, count


def main() -> None:
    """Write the data, time each path, print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1024, help="number of JPEGs")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--shards", type=int, default=8, help="shard count (at least the largest worker count)")
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp) / "jpegs", a.n, a.resolution)
        shards = write_shards(Path(tmp) / "jpegs", Path(tmp) / "shards", -(-a.n // a.shards), fmt="keep")
        urls = [str(s) for s in shards]
        megabytes = sum(s.stat().st_size for s in shards) / 2**20
        print(
            f"{a.n} JPEGs at {a.resolution} px ({megabytes:.1f} MiB in {len(shards)} shards), batch "
            f"{a.batch_size}, torch threads {torch.get_num_threads()}, {os.cpu_count()} CPU cores"
        )

        rows = []
        base, _ = time_pass(lambda: pil_loop(paths, a.resolution, a.batch_size), a.repeats)
        rows.append(("PIL loop (decode + same transform)", 0, base))
        for w in a.workers:
            dm = WebDataModule(
                urls,
                resolution=a.resolution,
                batch_size=a.batch_size,
                num_workers=w,
                resampled=False,
                shuffle_buffer=256,
                random_crop=True,
                random_flip=True,
                pin_memory=False,
            )
            rate, count = time_pass(dm.train_dataloader, a.repeats)
            assert count == a.n, f"shard pipeline gave {count} of {a.n} images"
            rows.append(("shards: WebDataModule", w, rate))
        for w in a.workers:
            dm = FolderDataModule(
                Path(tmp) / "jpegs",
                resolution=a.resolution,
                batch_size=a.batch_size,
                num_workers=w,
                random_crop=True,
                random_flip=True,
                drop_last=False,
                pin_memory=False,
            )
            rate, _ = time_pass(dm.train_dataloader, a.repeats)
            rows.append(("folder: FolderDataModule", w, rate))

    print(f"\n| {'pipeline':<36} | workers | images/s | vs PIL loop |")
    print(f"|{'-' * 38}|---------|----------|-------------|")
    for name, w, rate in rows:
        print(f"| {name:<36} | {w:>7} | {rate:>8.0f} | {rate / base:>10.2f}x |")


if __name__ == "__main__":
    main()
