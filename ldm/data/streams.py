"""Sample streams over shards: URL expansion, splitting by rank and worker, resampling, mixing sources,
shuffling, and collation into the batch contract (used by `ldm.data.webdataset`).

Split out of webdataset.py so that each file has one job; see that module's doc for the whole pipeline.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from webdataset.shardlists import expand_urls as _wds_expand_urls
from webdataset.tariterators import tarfile_samples

from ldm.data.stats import SkipCounter

log = logging.getLogger(__name__)

# Marks the last item of a worker's finite stream when it only carries skip counts (no samples came
# after its last batch); `WebLoader` absorbs it, so training code never sees it.
STATS_ONLY = "_stats_only"

UrlSpec = str | Sequence[str]


def expand_urls(urls: UrlSpec) -> list[str]:
    """Shard URLs from a brace pattern ("/data/{00000..00099}.tar"), a "::"-joined string, or a list of
    either; local paths, `pipe:` commands and anything else webdataset's `gopen` opens."""
    if isinstance(urls, str):
        return list(_wds_expand_urls(urls))
    return [u for item in urls for u in expand_urls(item if isinstance(item, str) else list(item))]


def parse_sources(urls: UrlSpec | Sequence[UrlSpec], weights: Sequence[float] | None) -> list[list[str]]:
    """One shard list per source: `urls` is one source, or, when `weights` is given, a list of sources
    (each a pattern or a list of URLs) mixed with those sampling probabilities."""
    if weights is None:
        sources = [expand_urls(urls)]
    else:
        if isinstance(urls, str) or len(urls) != len(weights):
            raise ValueError("with `weights`, `urls` must list one source (pattern or list) per weight")
        if any(float(w) < 0 for w in weights) or sum(float(w) for w in weights) <= 0:
            raise ValueError(f"weights must be non-negative and not all zero, got {list(weights)}")
        sources = [expand_urls(u) for u in urls]
    for i, source in enumerate(sources):
        if not source:
            raise ValueError(f"source {i} of {urls!r} expands to no shards")
    return sources


def split_plan(
    n_shards: int, rank: int, world_size: int, worker: int, num_workers: int
) -> list[tuple[int, int, int]]:
    """What one worker of one rank reads in finite mode, as (shard index, modulus, residue): it keeps the
    j-th sample of that shard when j % modulus == residue. Over all ranks and workers every sample is
    kept exactly once.

    With enough shards, whole shards are split (webdataset's split_by_node + split_by_worker). With fewer
    shards than ranks x workers, webdataset leaves workers with nothing, and a rank without data hangs
    DDP (webdataset #188); here the shards are split by rank where possible and then by sample within
    each shard, so every worker gets data at the cost of reading shards more than once.
    """
    total, gid = world_size * num_workers, rank * num_workers + worker
    if n_shards >= total:
        return [(i, 1, 0) for i in range(gid, n_shards, total)]
    if n_shards >= world_size:
        mine = range(rank, n_shards, world_size)
        # Offsetting the residue by the shard's position spreads each shard's remainder over the workers.
        return [(i, num_workers, (worker - pos) % num_workers) for pos, i in enumerate(mine)]
    return [(i, total, (gid - i) % total) for i in range(n_shards)]


def read_shard(url: str, counter: SkipCounter) -> Iterator[dict[str, Any]]:
    """Raw samples (member suffix -> bytes, plus "__key__" and "__url__") of one tar shard; an unreadable
    or truncated shard is logged, counted as "shard_error", and ends early instead of raising."""

    errors = 0

    def handler(exn: Exception) -> bool:
        nonlocal errors
        errors += 1
        if errors == 1:  # one broken shard raises at several levels (member, header, stream): count it once
            counter.add("shard_error")
        log.warning("skipping unreadable shard data in %s: %r", url, exn)
        return True  # continue with the next member / shard

    yield from tarfile_samples([{"url": url}], handler=handler)


def finite_samples(urls: list[str], plan: list[tuple[int, int, int]], counter: SkipCounter) -> Iterator[dict]:
    """One pass over this worker's share of `urls` (see `split_plan`)."""
    for index, modulus, residue in plan:
        for j, sample in enumerate(read_shard(urls[index], counter)):
            if j % modulus == residue:
                yield sample


def resampled_samples(urls: list[str], rng: random.Random, counter: SkipCounter) -> Iterator[dict]:
    """An endless stream: shards drawn with replacement by `rng` (seeded per rank and worker, so ranks
    draw different shards; webdataset's ResampledShards is not deterministic by default)."""
    empty_in_a_row, limit = 0, max(16, 2 * len(urls))
    while True:
        n = 0
        for sample in read_shard(rng.choice(urls), counter):
            n += 1
            yield sample
        empty_in_a_row = 0 if n else empty_in_a_row + 1
        if empty_in_a_row >= limit:  # all shards broken or empty: fail loudly rather than spin forever
            raise RuntimeError(f"{empty_in_a_row} shards in a row gave no samples (first shard: {urls[0]})")


def mix(streams: list[Iterator[dict]], weights: Sequence[float], rng: random.Random) -> Iterator[dict]:
    """Draw each sample from a source chosen with probability proportional to its weight (webdataset
    `RandomMix`); an exhausted source leaves the mix, so a finite mix yields every sample once."""
    streams, weights = list(streams), [float(w) for w in weights]
    while streams:
        i = rng.choices(range(len(streams)), weights)[0] if len(streams) > 1 else 0
        try:
            yield next(streams[i])
        except StopIteration:
            del streams[i], weights[i]


def shuffle(samples: Iterator[dict], bufsize: int, rng: random.Random) -> Iterator[dict]:
    """Reservoir-style shuffle buffer over raw (still encoded) samples: shuffling before decoding keeps
    the buffer small in memory (webdataset's advice)."""
    buf: list[dict] = []
    for sample in samples:
        if len(buf) < bufsize:
            buf.append(sample)
            continue
        k = rng.randrange(bufsize)
        yield buf[k]
        buf[k] = sample
    rng.shuffle(buf)
    yield from buf


def collate(samples: list[dict[str, Any]], skipped: dict[str, int]) -> dict[str, Any]:
    """Stack processed samples (all of one size) into a batch of the data contract."""
    batch: dict[str, Any] = {
        "image": torch.stack([s["image"] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "original_size": torch.tensor([s["original_size"] for s in samples], dtype=torch.long),
        "crop_coords": torch.tensor([s["crop_coords"] for s in samples], dtype=torch.long),
        "key": [s["key"] for s in samples],
        "skipped": skipped,
    }
    if all("label" in s for s in samples):
        batch["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)
    return batch
