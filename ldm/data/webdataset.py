"""LAION-style WebDataset shards (img2dataset layout) as a stream of batches, and its DataModule.

Each DataLoader worker runs webdataset's stages (tmbdev/webdataset `wds.WebDataset`), with the pitfalls
from its issue tracker handled (node splitting for world_size > 1, fewer shards than workers #188, uneven
ranks #225, per-worker `with_epoch` #303, ranks resampling the same shards):

    shards of each source -> split by rank and worker (finite) or drawn per rank and worker (resampled)
    -> tar members grouped by key -> mix sources by weight -> shuffle raw bytes -> parse, filter, decode,
    transform (`filters.SampleProcessor`) -> batch, within a bucket if bucketing -> collate

Sample layout (img2dataset): `{key}.jpg|jpeg|png|webp`, `{key}.txt` (caption), `{key}.json` (width,
height, original_width, original_height, similarity, pwatermark, punsafe, ...); optionally a label member
such as `{key}.cls` (`label_key`). Batches follow the data contract: "image" (B, 3, H, W) in [-1, 1],
"caption", "original_size" (B, 2) = (h, w), "crop_coords" (B, 2) = (top, left), "key", optional
"label", plus "skipped" (reason -> count since the worker's previous batch; see `ldm.data.stats`).
"""

from __future__ import annotations

import logging
import math
import os
import random
import warnings
import weakref
from collections import Counter
from collections.abc import Iterator, Sequence
from itertools import islice
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ldm.data.bucketing import AspectBuckets, BucketBatcher
from ldm.data.filters import FilterConfig, SampleProcessor
from ldm.data.stats import SkipCounter, accumulate
from ldm.data.streams import (  # noqa: F401 - re-exported: the stream pieces are part of this module's API
    STATS_ONLY,
    UrlSpec,
    collate,
    expand_urls,
    finite_samples,
    mix,
    parse_sources,
    read_shard,
    resampled_samples,
    shuffle,
    split_plan,
)
from ldm.data.transforms import ImageTransform

log = logging.getLogger(__name__)


class WebImageDataset(IterableDataset):
    """The per-worker pipeline; yields collated batches (batching happens in the workers, so the
    DataLoader runs with batch_size=None). `rank` / `world_size` are resolved in the main process by the
    DataModule, because a DataLoader worker may not see the initialised process group."""

    def __init__(
        self,
        sources: list[list[str]],
        processor: SampleProcessor,
        batch_size: int,
        *,
        weights: Sequence[float] | None = None,
        resampled: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        self.sources, self.processor, self.batch_size = sources, processor, batch_size
        self.weights = list(weights) if weights is not None else [1.0] * len(sources)
        self.resampled, self.shuffle_buffer, self.seed = resampled, shuffle_buffer, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._iters = 0  # iterations started in this process: persistent workers never see set_epoch

    def set_epoch(self, epoch: int) -> None:
        """Reseed shuffling and augmentation for a new pass (called by `WebLoader` before it starts)."""
        self.epoch = epoch

    def _rng(self, epoch: int, *parts: Any) -> random.Random:
        """A generator seeded from the config seed, the epoch and `parts` (string seeds are hashed with
        SHA-512 by `random`, so they are the same in every process whatever PYTHONHASHSEED is)."""
        return random.Random("/".join(str(p) for p in (self.seed, epoch, *parts)))

    def _raw_samples(self, epoch: int, worker: int, num_workers: int, counter: SkipCounter) -> Iterator[dict]:
        """Raw samples of every source for this worker, mixed by weight."""
        streams = []
        for s, urls in enumerate(self.sources):
            if self.resampled:
                rng = self._rng(epoch, "shards", s, self.rank, worker)
                streams.append(resampled_samples(urls, rng, counter))
                continue
            if self.shuffle_buffer > 1:
                # The same order on every rank and worker (no rank in the seed), so the split stays exact.
                urls = list(urls)
                self._rng(epoch, "shard-order", s).shuffle(urls)
            plan = split_plan(len(urls), self.rank, self.world_size, worker, num_workers)
            streams.append(finite_samples(urls, plan, counter))
        return mix(streams, self.weights, self._rng(epoch, "mix", self.rank, worker))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Batches for this worker; a finite stream ends with any skip counts not yet reported."""
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # In the main process set_epoch reaches this object; a persistent worker's copy never sees it, so
        # there the passes it started count instead.
        epoch = self.epoch if info is None else self.epoch + self._iters
        self._iters += 1
        counter = SkipCounter()
        samples = self._raw_samples(epoch, worker, num_workers, counter)
        if self.shuffle_buffer > 1:
            samples = shuffle(samples, self.shuffle_buffer, self._rng(epoch, "shuffle", self.rank, worker))
        aug_rng = self._rng(epoch, "augment", self.rank, worker)
        batcher = BucketBatcher(self.batch_size)  # without bucketing every sample has the same "bucket"
        for raw in samples:
            out = self.processor(raw, aug_rng)
            if isinstance(out, str):
                counter.add(out)
                continue
            full = batcher.add(out["bucket"], out)
            if full is not None:
                yield collate(full, counter.take())
        for partial in batcher.flush():  # only reached by finite streams
            yield collate(partial, counter.take())
        if counter:
            yield {"skipped": counter.take(), STATS_ONLY: True}


def _absorb_skip_counts(batches: Iterator[dict[str, Any]], counts: Counter[str]) -> Iterator[dict[str, Any]]:
    """Add each item's "skipped" counts to `counts` and pass on the items that are batches."""
    for item in batches:
        accumulate(counts, item.get("skipped"))
        if not item.get(STATS_ONLY):
            yield item


class WebLoader(DataLoader):
    """A DataLoader over `WebImageDataset` that moves each batch's skip counts into `skip_counts` (in the
    main process) and drops the stats-only items.

    In resampled mode with `steps_per_epoch`, one endless stream lives across epochs and each epoch is the
    next `steps_per_epoch` batches of it: the epoch length sits on the loader, after batching, because
    webdataset's `with_epoch` on the dataset counts per worker (webdataset #303), and every rank yields
    the same number of batches, so collectives cannot deadlock on uneven ranks (#225).
    """

    def __init__(
        self,
        dataset: WebImageDataset,
        *,
        num_workers: int = 0,
        skip_counts: Counter[str] | None = None,
        steps_per_epoch: int | None = None,
        start_epoch: int = 0,
        skip_batches: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = 2,
    ) -> None:
        super().__init__(
            dataset,
            batch_size=None,  # the dataset batches (within buckets), the loader only moves batches
            num_workers=num_workers,
            pin_memory=pin_memory,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
        )
        self.skip_counts = skip_counts if skip_counts is not None else Counter()
        self.steps_per_epoch = steps_per_epoch
        self._epoch = start_epoch
        self._skip = skip_batches  # batches a resumed run already trained on: passed over once
        self._live: Iterator[dict[str, Any]] | None = None

    def _fresh(self) -> Iterator[dict[str, Any]]:
        """Start a new pass of the dataset (workers fork now, with the new epoch)."""
        self.dataset.set_epoch(self._epoch)
        self._epoch += 1
        # The generator must not reference the loader: a loader <-> generator cycle is freed only by the
        # garbage collector, whose shutdown of the workers waits out a 5 s timeout per worker.
        stream = _absorb_skip_counts(super().__iter__(), self.skip_counts)
        skip, self._skip = self._skip, 0
        if skip:
            # Exact resume: the same stream as the interrupted run, from where it stopped. The skipped
            # batches are still decoded; for very long resampled runs `exact_resume=false` avoids that.
            next(islice(stream, skip, skip), None)
        return stream

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """One epoch: a full pass (finite) or the next `steps_per_epoch` batches of the live stream."""
        if self.steps_per_epoch is None:
            yield from self._fresh()
            return
        if self._live is None:
            self._live = self._fresh()
        yield from islice(self._live, self.steps_per_epoch)

    def close(self) -> None:
        """End the live stream, shutting its worker processes down now rather than whenever the garbage
        collector breaks the loader <-> generator reference cycle."""
        if self._live is not None:
            self._live.close()
            self._live = None

    def __len__(self) -> int:
        """Batches per epoch, known only in resampled mode with an epoch size (TypeError otherwise, which
        Lightning reads as "length unknown")."""
        if self.steps_per_epoch is None:
            raise TypeError("a finite or unbounded WebLoader has no length")
        return self.steps_per_epoch


def _plain(x: Any) -> Any:
    """Hydra's ListConfig / DictConfig as plain lists / dicts, so datasets stay simple to pickle."""
    if isinstance(x, ListConfig | DictConfig):
        return OmegaConf.to_container(x, resolve=True)
    return x


def resolve_rank(
    rank: int | None = None, world_size: int | None = None, trainer: pl.Trainer | None = None
) -> tuple[int, int]:
    """(rank, world_size) for splitting shards: explicit arguments, else the attached Trainer, else an
    initialised torch.distributed, else the RANK / WORLD_SIZE environment variables (set by torchrun),
    else (0, 1). Unlike webdataset's default node splitter this never refuses world_size > 1."""
    if rank is None or world_size is None:
        if trainer is not None:
            rank, world_size = trainer.global_rank, trainer.world_size
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return rank, world_size


def resume_position(trainer: pl.Trainer | None, resampled: bool = False) -> tuple[int, int]:
    """Where a training stream continues: (dataset epoch, batches of it to pass over), from the Trainer's
    progress counters, which Lightning restores from the checkpoint before it asks for the loader
    (pytorch_lightning/trainer/trainer.py `_run`: `restore_training_state`, then `fit_loop.run` ->
    `setup_data`). (0, 0) for a fresh run.

    Finite epochs: an epoch begun and not completed resumes after its `processed` batches (those whose
    training step ran; `ready` also counts one fetched and not trained); otherwise the next epoch starts
    from its first batch (the batch counter still holds the previous epoch's count then: Lightning resets
    it later). Resampled: one stream over all epochs, continued after every batch trained so far. The
    counters say exactly what was trained when `ldm.training.resume.ExactResume` wrote the checkpoint."""
    if trainer is None:
        return 0, 0
    batches, epochs = trainer.fit_loop.epoch_loop.batch_progress, trainer.fit_loop.epoch_progress.current
    if resampled:
        return 0, int(batches.total.processed)
    open_epoch = epochs.ready > epochs.completed
    return int(trainer.current_epoch), int(batches.current.processed) if open_epoch else 0


class WebDataModule(pl.LightningDataModule):
    """LightningDataModule for img2dataset WebDataset shards (configs/data/webdataset.yaml).

    Training reads `urls` resampled (endless; `epoch_size` samples over all ranks or `epoch_steps`
    batches per rank make an epoch, else train with `max_steps`) or, with `resampled=False`, as finite
    passes where each sample is seen once per epoch across all ranks and workers. Validation reads
    `val_urls` once, in order, center-cropped and unflipped. In finite mode ranks can get different batch
    counts; under DDP keep validation metrics rank-local or set `limit_val_batches`.

    Skipped samples: `skip_counts` (training) and `val_skip_counts` are running Counters reason -> count,
    updated as batches arrive; each batch's own counts are in `batch["skipped"]`. A system logs them with
    `self.log_dict(skip_log_dict(self.trainer.datamodule.skip_counts), reduce_fx="sum", sync_dist=True)`.
    """

    def __init__(
        self,
        urls: UrlSpec | Sequence[UrlSpec],
        val_urls: UrlSpec | Sequence[UrlSpec] | None = None,
        weights: Sequence[float] | None = None,
        val_weights: Sequence[float] | None = None,
        resolution: int = 256,
        batch_size: int = 8,
        num_workers: int = 4,
        shuffle_buffer: int = 1000,
        resampled: bool = True,
        epoch_size: int | None = None,
        epoch_steps: int | None = None,
        random_crop: bool = False,
        random_flip: bool = True,
        filters: dict[str, Any] | FilterConfig | None = None,
        bucketing: dict[str, Any] | None = None,
        label_key: str | None = None,
        seed: int = 0,
        pin_memory: bool | None = None,
        prefetch_factor: int = 2,
        rank: int | None = None,
        world_size: int | None = None,
        exact_resume: bool = True,
    ) -> None:
        super().__init__()
        if epoch_size is not None and epoch_steps is not None:
            raise ValueError("give epoch_size (samples, all ranks) or epoch_steps (batches per rank)")
        if not resampled and (epoch_size is not None or epoch_steps is not None):
            warnings.warn(
                "epoch_size / epoch_steps apply to resampled streams; an epoch is one pass", stacklevel=2
            )
        urls, val_urls, weights, val_weights = map(_plain, (urls, val_urls, weights, val_weights))
        self.sources = parse_sources(urls, weights)
        self.val_sources = parse_sources(val_urls, val_weights) if val_urls else None
        self.weights, self.val_weights = weights, val_weights
        self.resolution, self.batch_size, self.num_workers = resolution, batch_size, num_workers
        self.shuffle_buffer, self.resampled, self.seed = shuffle_buffer, resampled, seed
        self.epoch_size, self.epoch_steps = epoch_size, epoch_steps
        self.random_crop, self.random_flip, self.label_key = random_crop, random_flip, label_key
        self.filters = FilterConfig.from_dict(filters)
        self.buckets = AspectBuckets.from_config(dict(bucketing), resolution) if bucketing else None
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.prefetch_factor = prefetch_factor
        self.rank, self.world_size = rank, world_size
        self.exact_resume = exact_resume
        self.skip_counts: Counter[str] = Counter()
        self.val_skip_counts: Counter[str] = Counter()
        self._loaders: weakref.WeakSet[WebLoader] = weakref.WeakSet()  # to close live streams on teardown

    def steps_per_epoch(self, world_size: int = 1) -> int | None:
        """Batches per rank per training epoch in resampled mode (None: finite or unbounded)."""
        if not self.resampled:
            return None
        if self.epoch_steps is not None:
            return int(self.epoch_steps)
        if self.epoch_size is not None:
            return max(1, math.ceil(self.epoch_size / (self.batch_size * world_size)))
        return None

    def _loader(self, sources: list[list[str]], weights: Any, train: bool, counts: Counter[str]) -> WebLoader:
        """A WebLoader for training (resampling / shuffling / augmenting as configured) or evaluation."""
        trainer = self.trainer if self.rank is None else None
        rank, world_size = resolve_rank(self.rank, self.world_size, trainer)
        resampled = self.resampled and train
        if train and not resampled and world_size > 1:
            warnings.warn(
                "finite training epochs under DDP: ranks can get different numbers of batches, and a rank "
                "that finishes early leaves the others waiting in all-reduce; prefer resampled=true with "
                "epoch_size",
                stacklevel=2,
            )
        if not resampled:
            workers = max(1, self.num_workers)
            for i, urls in enumerate(sources):
                if len(urls) < world_size * workers:
                    warnings.warn(
                        f"source {i} has {len(urls)} shard(s) for {world_size} rank(s) x {workers} "
                        "worker(s): splitting by sample, so shards are read more than once; write at least "
                        "ranks x workers shards to avoid this",
                        stacklevel=2,
                    )
        processor = SampleProcessor(
            self.filters,
            ImageTransform(self.resolution, self.random_crop and train, self.random_flip and train),
            self.buckets,
            self.label_key,
        )
        dataset = WebImageDataset(
            sources,
            processor,
            self.batch_size,
            weights=weights,
            resampled=resampled,
            shuffle_buffer=self.shuffle_buffer if train else 0,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
        )
        start, skip = self._resume_position(resampled) if train else (0, 0)
        loader = WebLoader(
            dataset,
            num_workers=self.num_workers,
            skip_counts=counts,
            steps_per_epoch=self.steps_per_epoch(world_size) if train else None,
            start_epoch=start,
            skip_batches=skip,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor,
        )
        self._loaders.add(loader)
        return loader

    def _resume_position(self, resampled: bool) -> tuple[int, int]:
        """(dataset epoch to start from, batches to pass over) for the training loader. exact_resume:
        finite mode replays the open epoch from its first untrained batch, resampled mode continues its one
        stream (`resume_position`); otherwise a resumed run reseeds its stream from the step (no replay,
        no skipping)."""
        trainer = self.trainer
        if trainer is None:
            return 0, 0
        if not self.exact_resume:
            return int(trainer.global_step), 0
        return resume_position(trainer, resampled)

    def teardown(self, stage: str) -> None:
        """Stop the worker processes of live resampled streams (Lightning calls this after fit)."""
        for loader in list(self._loaders):
            loader.close()
        self._loaders.clear()

    def train_dataloader(self) -> WebLoader:
        """The training stream over `urls`."""
        return self._loader(self.sources, self.weights, True, self.skip_counts)

    def val_dataloader(self) -> WebLoader | list:
        """One ordered pass over `val_urls` ([] when there are none, which Lightning treats as no
        validation)."""
        if self.val_sources is None:
            return []
        return self._loader(self.val_sources, self.val_weights, False, self.val_skip_counts)
