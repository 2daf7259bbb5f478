"""Streaming loader over VT-Instruct shards: deterministic, resumable, worker-safe,
and tolerant of corrupt samples.

Order: one permutation of all samples per (seed, epoch); rank r of a world of size R
takes positions r, r+R, ... of it (like DistributedSampler, without padding); inside a
DataLoader, worker w of W takes every W-th item of its rank's stream. PyTorch hands
worker results back round-robin, so the main process sees the rank's stream in exactly
its order, whatever W is. ``state_dict()`` is the position in that stream; loading it
continues with exactly the same next samples.

Corrupt samples (unreadable image, bad RLE, box outside the image, <REF>/target count
mismatch, ...) are skipped, counted per reason and logged with their id; they never
raise.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Any, BinaryIO, Iterator

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from refvlm_core.errors import InputError
from refvlm_core.sample import Sample

from refvlm_training.data.schema import SampleError
from refvlm_training.data.shards import ShardEntry, decode_files, index_shard, list_shards, read_entry

log = logging.getLogger(__name__)

# (position in the rank's stream, the sample or None, skip reason or None)
StreamItem = tuple[int, Sample | None, str | None]


def collate_samples(samples: list[Sample | None]) -> list[Sample]:
    """A batch is the list of its Samples: targets keep their variable number of
    instances per unit, and the model's processor turns them into tensors."""
    return [s for s in samples if s is not None]


def _identity(item: StreamItem) -> StreamItem:
    return item


class _RankStream(IterableDataset):
    """Positions ``start..`` of one rank's order; each DataLoader worker takes its share."""

    def __init__(self, entries: list[ShardEntry], order: np.ndarray, start: int) -> None:
        self.entries = entries
        self.order = order
        self.start = start

    def __iter__(self) -> Iterator[StreamItem]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        handles: dict[str, BinaryIO] = {}
        try:
            for position in range(self.start + worker, len(self.order), workers):
                yield self._load(position, handles)
        finally:
            for handle in handles.values():
                handle.close()

    def _load(self, position: int, handles: dict[str, BinaryIO]) -> StreamItem:
        entry = self.entries[int(self.order[position])]
        try:
            handle = handles.get(str(entry.shard))
            if handle is None:
                handle = handles[str(entry.shard)] = open(entry.shard, "rb")
            return position, decode_files(entry.key, read_entry(handle, entry)), None
        except SampleError as error:
            log.warning("skipping sample %s in %s: %s", error.sample_id, entry.shard.name, error)
            return position, None, error.reason
        except (OSError, ValueError, KeyError, IndexError) as error:  # a damaged shard, not only a bad record
            log.warning("skipping sample %s in %s: %s: %s", entry.key, entry.shard.name, type(error).__name__, error)
            return position, None, "io_error"


class VTInstructDataset(IterableDataset):
    """Samples of a shard directory (or one shard), for one rank.

    Iterating it directly streams in this process; ``batches()`` streams through a
    DataLoader with worker processes. Either way ``position``/``skipped`` advance here.
    """

    def __init__(self, path: str | os.PathLike, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, max_samples: int | None = None) -> None:
        """``max_samples``: use only the first that many samples of the shards (in shard order)."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise InputError(f"rank {rank} is not in a world of size {world_size}")
        self.entries: list[ShardEntry] = [e for shard in list_shards(path) for e in index_shard(shard)]
        if max_samples is not None:
            self.entries = self.entries[:max_samples]
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.epoch = 0
        self.position = 0                 # items of this rank's stream consumed this epoch
        self.skipped: Counter[str] = Counter()

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` (a new permutation) from its beginning."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def order(self) -> np.ndarray:
        """Indices into ``entries`` of this rank's stream for the current epoch."""
        total = len(self.entries)
        if self.shuffle:
            everything = np.random.default_rng([self.seed, self.epoch]).permutation(total)
        else:
            everything = np.arange(total)
        return everything[self.rank::self.world_size]

    def __len__(self) -> int:
        return len(self.order())

    def _consume(self, item: StreamItem) -> Sample | None:
        position, sample, reason = item
        self.position = position + 1
        if reason is not None:
            self.skipped[reason] += 1
        return sample

    def __iter__(self) -> Iterator[Sample]:
        for item in _RankStream(self.entries, self.order(), self.position):
            sample = self._consume(item)
            if sample is not None:
                yield sample

    def batches(self, batch_size: int, num_workers: int = 0, drop_last: bool = False) -> Iterator[list[Sample]]:
        """Batches of ``batch_size`` good samples, read by ``num_workers`` processes."""
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        loader = DataLoader(_RankStream(self.entries, self.order(), self.position), batch_size=None,
                            num_workers=num_workers, collate_fn=_identity,
                            persistent_workers=False)
        batch: list[Sample] = []
        for item in loader:
            sample = self._consume(item)
            if sample is not None:
                batch.append(sample)
            if len(batch) == batch_size:
                yield collate_samples(batch)
                batch = []
        if batch and not drop_last:
            yield collate_samples(batch)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position,
                "rank": self.rank, "world_size": self.world_size, "num_samples": len(self.entries),
                "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` was taken (same data, seed and world size)."""
        for key in ("seed", "rank", "world_size", "num_samples"):
            mine = len(self.entries) if key == "num_samples" else getattr(self, key)
            if state.get(key) != mine:
                raise InputError(f"loader state has {key}={state.get(key)!r} but this loader has {mine!r}: "
                                 "resume with the same shards, seed and world size")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.skipped = Counter(state.get("skipped", {}))

