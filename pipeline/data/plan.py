"""Epoch plans: which shard rows each training worker reads in an epoch, in which order, and where a run stands.

Pure NumPy (no Ray, no torch): the stream (`pipeline/data/stream.py`) executes a plan, the training loop
checkpoints a position, and both are plain values.

    chunks = ChunkTable(files, file_index, group, rows)        # one entry per Parquet row group
    plan = EpochPlan(chunks, seed=0, epoch=3, shuffle=True)
    share = plan.rank_share(consumed=[], rank=1, world=4, batch=2)   # S-intervals of worker 1's rows
    pieces = plan.pieces(share)                                      # (chunk, lo, hi) reads for them
    consumed = plan.advance([], world=4, batch=2, rows_per_rank=40)  # after 20 steps of 2 images per worker

The unit of reading is a chunk: one row group of one shard file (the writer's 256 rows), read whole, so no byte
is read twice in an epoch. An epoch's sequence S (N rows) is the chunks in a seeded order, each chunk's rows in a
seeded order, both from (seed, epoch) only: the same on every worker, in every process, under any world size.

A position in an epoch is the set of S-indices already trained, kept as sorted disjoint half-open intervals
(`consumed`): a few integers per resume, whatever the epoch size. Worker r of W reads the r-th of W equal,
contiguous slices of the rest of S. Each slice is rounded down to a multiple of the batch size, so every worker
has the same number of full batches (DDP lockstep) and no batch holds rows of two epochs; the up to W*B-1 rows
left over are not trained in that epoch (drop_last; a different set every epoch since S is reshuffled).
After a worker has trained p rows of its slice, the first p rows of every slice are consumed (all workers step
together), which `advance` computes on any worker without communication. A resume, with the same or another world
size, reads the rest of S and nothing else: exactly once, and the skipped rows are never read or decoded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Intervals = list[tuple[int, int]]


@dataclass(frozen=True, eq=False)
class ChunkTable:
    """The row groups of a split: chunk k is row group `group[k]` of `files[file_index[k]]`, `rows[k]` rows."""

    files: tuple[str, ...]
    file_index: np.ndarray  # (n,) int64
    group: np.ndarray       # (n,) int64
    rows: np.ndarray        # (n,) int64

    def __post_init__(self) -> None:
        n = len(self.rows)
        if not (len(self.file_index) == len(self.group) == n):
            raise ValueError(f"chunk table columns differ in length: {len(self.file_index)} file indices, "
                             f"{len(self.group)} groups, {n} row counts")
        if n and (self.rows.min() < 1 or self.file_index.max() >= len(self.files)):
            raise ValueError("chunk table: every chunk needs >= 1 row and a file index below the number of files")

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def total_rows(self) -> int:
        return int(self.rows.sum())

    def fingerprint(self) -> str:
        """Identity of the split's layout (file names and row groups): a saved position applies only to it."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(f.rsplit("/", 1)[-1].encode() + b"\0")
        for col in (self.file_index, self.group, self.rows):
            h.update(np.ascontiguousarray(col, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]

    def to_dict(self) -> dict:
        return {"files": list(self.files), "file_index": self.file_index.tolist(), "group": self.group.tolist(),
                "rows": self.rows.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> ChunkTable:
        return cls(tuple(d["files"]), *(np.asarray(d[k], dtype=np.int64) for k in ("file_index", "group", "rows")))


def _rng(seed: int, epoch: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, *key])


def row_order(rows: int, *, seed: int, epoch: int, chunk: int, shuffle: bool) -> np.ndarray:
    """The order of a chunk's `rows` rows in an epoch: a seeded permutation (shuffle) or 0..rows-1."""
    return _rng(seed, epoch, 1, chunk).permutation(rows) if shuffle else np.arange(rows)


def merge(intervals: Sequence[tuple[int, int]]) -> Intervals:
    """Sorted, disjoint, non-empty half-open intervals covering the same indices."""
    out: Intervals = []
    for lo, hi in sorted((int(a), int(b)) for a, b in intervals if b > a):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def complement(consumed: Sequence[tuple[int, int]], total: int) -> Intervals:
    """[0, total) minus `consumed`."""
    out, at = [], 0
    for lo, hi in merge(consumed):
        if lo > at:
            out.append((at, min(lo, total)))
        at = max(at, hi)
    if at < total:
        out.append((at, total))
    return [(lo, hi) for lo, hi in out if hi > lo]


def sub_range(intervals: Sequence[tuple[int, int]], start: int, count: int) -> Intervals:
    """Elements start .. start+count-1 of the concatenation of `intervals`, as intervals."""
    out: Intervals = []
    for lo, hi in intervals:
        n = hi - lo
        if start >= n:
            start -= n
            continue
        take = min(n - start, count)
        if take > 0:
            out.append((lo + start, lo + start + take))
        count -= take
        start = 0
        if count <= 0:
            break
    return out


@dataclass(frozen=True, eq=False)
class EpochPlan:
    """One epoch's sequence S over `chunks` (see the module doc)."""

    chunks: ChunkTable
    seed: int
    epoch: int
    shuffle: bool

    def __post_init__(self) -> None:
        n = len(self.chunks)
        order = _rng(self.seed, self.epoch, 0).permutation(n) if self.shuffle else np.arange(n)
        object.__setattr__(self, "order", order)
        object.__setattr__(self, "starts", np.concatenate([[0], np.cumsum(self.chunks.rows[order])]))

    @property
    def total(self) -> int:
        return int(self.starts[-1])

    def rows_per_rank(self, consumed: Sequence[tuple[int, int]], world: int, batch: int) -> int:
        """Rows every worker reads in the rest of the epoch: a multiple of `batch`, equal for all workers."""
        left = sum(hi - lo for lo, hi in complement(consumed, self.total))
        return left // world // batch * batch

    def rank_share(self, consumed: Sequence[tuple[int, int]], rank: int, world: int, batch: int) -> Intervals:
        """S-intervals of worker `rank`'s slice of the rest of the epoch, in reading order."""
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} out of range for world size {world}")
        per = self.rows_per_rank(consumed, world, batch)
        return sub_range(complement(consumed, self.total), rank * per, per)

    def advance(self, consumed: Sequence[tuple[int, int]], world: int, batch: int, rows_per_rank: int) -> Intervals:
        """`consumed` plus the first `rows_per_rank` rows of every worker's slice (all workers stepped together)."""
        per = self.rows_per_rank(consumed, world, batch)
        if not 0 <= rows_per_rank <= per:
            raise ValueError(f"rows_per_rank={rows_per_rank} outside 0..{per} (the slice of each worker)")
        rest = complement(consumed, self.total)
        done = [iv for r in range(world) for iv in sub_range(rest, r * per, rows_per_rank)]
        return merge([*consumed, *done])

    def pieces(self, share: Sequence[tuple[int, int]]) -> np.ndarray:
        """(m, 3) int64 rows (chunk, lo, hi): read chunk `chunk`'s rows at positions lo..hi-1 of its epoch order,
        in this order, to produce the S-intervals `share`."""
        out = []
        for a, b in share:
            j = int(np.searchsorted(self.starts, a, side="right")) - 1
            while a < b:
                end = int(self.starts[j + 1])
                hi = min(b, end)
                out.append((int(self.order[j]), a - int(self.starts[j]), hi - int(self.starts[j])))
                a, j = hi, j + 1
        return np.asarray(out, dtype=np.int64).reshape(-1, 3)
