"""Shard row groups -> Ray Data (read + decode + augment in one task per piece) -> augmented rows.

    chunks = scan_chunks(shard_files(cfg, "train"))                   # driver: Parquet footers only
    stream = TrainStream(cfg, chunks, rank=r, world=w, batch=2, first_epoch=e, epochs=12, consumed=[...])
    for epoch in stream.epochs():                                   # on each training worker
        for batch in stream.batches(epoch, device):                 # equal count on every worker
            ...
    stream.position(epoch, rows_done)                               # {"epoch", "consumed", "chunks"}: checkpoint it

The input of the Ray Data pipeline is a table of pieces (epoch, chunk, lo, hi) from `pipeline.data.plan`, not
a file listing: `ray.data.range(len(pieces))` feeds one piece per task to `read_decode`, which reads the piece's
row group once (the chunk), takes its rows in the epoch's order, and decodes + augments them `map_batch_size` at
a time, yielding a block for each. A training worker builds one such dataset for all the epochs it has left and
iterates it once: Ray Data plans and starts it once per run, the next epoch's first pieces are decoded while the
current one ends and while the model is evaluated, and the augmentation epoch is the piece's own `epoch` column.
The order of rows is the plan's (`preserve_order` on the dataset's own context), so the rows a worker has
trained are a prefix of its slice, and a position is a few integers. Rows skipped on a resume are never read.

Evaluation and prediction (`build_dataset(train=False)`) use the same reading over whole chunks in file order,
split over workers by Ray Train / Ray Data (`streaming_split`); there the order does not matter.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline import storage
from pipeline.data.collate import Batch, collate
from pipeline.data.config import AugmentConfig, DataConfig
from pipeline.data.plan import ChunkTable, EpochPlan, Intervals, row_order
from pipeline.data.samples import SHARD_COLUMNS, samples_to_table, table_to_samples
from pipeline.data.transforms import DetectionTransform, build_transforms, prepare_sample

if TYPE_CHECKING:
    import ray.data


def scan_chunks(files: Sequence[str], threads: int = 16) -> ChunkTable:
    """The row groups of `files` (Parquet footers only, read in parallel for object stores)."""
    fs, _ = storage.get_pyarrow_fs(files[0])

    def groups(uri: str) -> list[int]:
        with fs.open_input_file(storage.split_uri(uri)[1]) as f:
            meta = pq.ParquetFile(f).metadata
            return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(files)))) as pool:
        per_file = list(pool.map(groups, files))
    fi, gi, rows = [], [], []
    for i, counts in enumerate(per_file):
        for g, n in enumerate(counts):
            if n > 0:
                fi.append(i)
                gi.append(g)
                rows.append(n)
    return ChunkTable(tuple(files), *(np.asarray(c, dtype=np.int64) for c in (fi, gi, rows)))


@functools.lru_cache(maxsize=8)
def _transform(aug: AugmentConfig, train: bool, eval_size: tuple[int, int]) -> DetectionTransform:
    return build_transforms(aug, train=train, eval_size=eval_size)


def read_piece(chunks: ChunkTable, chunk: int, lo: int, hi: int, *, seed: int, epoch: int, shuffle: bool,
               filesystem: Any = None) -> pa.Table:
    """Rows lo..hi-1 (in the epoch's order of the chunk) of chunk `chunk`, columns SHARD_COLUMNS. `filesystem`:
    the pyarrow filesystem of the shards (default: resolved here from the URI and this process's environment)."""
    uri = chunks.files[int(chunks.file_index[chunk])]
    fs, path = storage.get_pyarrow_fs(uri)
    fs = filesystem or fs
    with fs.open_input_file(path) as f:
        table = pq.ParquetFile(f).read_row_group(int(chunks.group[chunk]), columns=SHARD_COLUMNS)
    if table.num_rows != int(chunks.rows[chunk]):
        raise ValueError(f"{uri} row group {int(chunks.group[chunk])}: {table.num_rows} rows, expected "
                         f"{int(chunks.rows[chunk])} (the shards changed after the run was planned)")
    order = row_order(table.num_rows, seed=seed, epoch=epoch, chunk=chunk, shuffle=shuffle)
    return table.take(pa.array(order[lo:hi]))


def read_decode(batch: pa.Table, *, pieces: np.ndarray, chunks: ChunkTable, filesystem: Any, aug: AugmentConfig,
                train: bool, eval_size: tuple[int, int], seed: int, drop_crowd: bool, rows_per_block: int
                ) -> Iterator[pa.Table]:
    """Ray Data map_batches UDF (CPU, generator): piece ids (column "id") -> augmented rows (AUGMENTED_SCHEMA
    + "epoch"), a block per `rows_per_block` images so the consumer gets the first ones early."""
    transform = _transform(aug, train, tuple(eval_size))
    for k in batch.column("id").to_pylist():
        epoch, chunk, lo, hi = (int(v) for v in pieces[k])
        rows = read_piece(chunks, chunk, lo, hi, seed=seed, epoch=epoch, shuffle=train, filesystem=filesystem)
        for start in range(0, rows.num_rows, rows_per_block):
            images, targets = [], []
            for row in rows.slice(start, rows_per_block).to_pylist():
                image, target = prepare_sample(row, transform, seed=seed, epoch=epoch, drop_crowd=drop_crowd)
                images.append(image)
                targets.append(target)
            yield samples_to_table(images, targets, epoch=epoch)


def build_stream(cfg: DataConfig, chunks: ChunkTable, pieces: np.ndarray, *, train: bool, workers: int,
                 ordered: bool, filesystem: Any = None) -> ray.data.Dataset:
    """Dataset of augmented rows for `pieces` ((m, 4) int64 rows epoch, chunk, lo, hi), decoded by at most
    `workers` tasks of 1 CPU at once; `ordered`: rows come out in the pieces' order (the dataset's own context,
    not the process-wide one). `filesystem` (default: resolved here) is pickled into the tasks, so they reach the
    store this process resolved (its endpoint and retry policy), not what their own environment says."""
    import ray.data

    pieces = np.ascontiguousarray(pieces, dtype=np.int64).reshape(-1, 4)
    if filesystem is None:
        filesystem = storage.get_pyarrow_fs(chunks.files[0])[0]
    if not len(pieces):
        raise ValueError("no rows to read: the plan is empty (fewer rows than workers x batch size?)")
    ds = ray.data.range(len(pieces), override_num_blocks=len(pieces))
    ds.context.execution_options.preserve_order = ordered
    return ds.map_batches(
        read_decode,  # type: ignore[arg-type]  # Ray types the UDF without keyword-only fn_kwargs
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.TaskPoolStrategy(size=max(1, workers)),
        num_cpus=1,
        fn_kwargs={"pieces": pieces, "chunks": chunks, "filesystem": filesystem, "aug": cfg.augment, "train": train,
                   "eval_size": tuple(cfg.eval_size), "seed": cfg.seed, "drop_crowd": cfg.drop_crowd and train,
                   "rows_per_block": cfg.map_batch_size},
    )


def one_pass_pieces(chunks: ChunkTable, *, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """(m, 4) pieces of one whole epoch (every row once), in the plan's order."""
    plan = EpochPlan(chunks, seed, epoch, shuffle)
    pieces = plan.pieces([(0, plan.total)])
    return np.concatenate([np.full((len(pieces), 1), epoch, dtype=np.int64), pieces], axis=1)


def iter_epoch_batches(tables: Iterator[pa.Table]) -> Iterator[tuple[int, pa.Table]]:
    """(epoch, table) from Arrow batches of an ordered stream; a batch holding two epochs is split at the change
    (the plan makes that not happen, but a short row group must not leak rows across epochs)."""
    for table in tables:
        if "epoch" not in table.column_names or table.num_rows == 0:
            yield 0, table
            continue
        ep = table.column("epoch").to_numpy()
        cuts = np.flatnonzero(np.diff(ep)) + 1
        for lo, hi in zip([0, *cuts], [*cuts, len(ep)]):
            yield int(ep[lo]), table.slice(lo, hi - lo)


class TrainStream:
    """A training worker's rows for the rest of the run, one Ray Data execution for all its epochs.

    `consumed`: S-intervals of `first_epoch` already trained (from the checkpoint's position), [] at an epoch start.
    `filesystem`: the shards' pyarrow filesystem as the driver resolved it (default: resolved on this worker).
    Every worker of the same world gets the same number of batches per epoch (`batches_in`).
    """

    def __init__(self, cfg: DataConfig, chunks: ChunkTable, *, rank: int, world: int, batch: int,
                 first_epoch: int, epochs: int, consumed: Sequence[tuple[int, int]] = (), filesystem: Any = None
                 ) -> None:
        self.cfg, self.chunks, self.rank, self.world, self.batch = cfg, chunks, rank, world, batch
        self.filesystem = filesystem
        self.first_epoch, self.last_epoch = first_epoch, epochs
        self.consumed: dict[int, Intervals] = {first_epoch: [tuple(iv) for iv in consumed]}  # type: ignore[misc]
        self._rows: dict[int, int] = {}
        parts = []
        for e in range(first_epoch, epochs):
            plan = self.plan(e)
            done = self.consumed.get(e, [])
            self._rows[e] = plan.rows_per_rank(done, world, batch)
            p = plan.pieces(plan.rank_share(done, rank, world, batch))
            parts.append(np.concatenate([np.full((len(p), 1), e, dtype=np.int64), p], axis=1))
        self.pieces = np.concatenate(parts) if parts else np.zeros((0, 4), dtype=np.int64)
        self._tables: Iterator[tuple[int, pa.Table]] | None = None
        self._held: tuple[int, pa.Table] | None = None

    def plan(self, epoch: int) -> EpochPlan:
        return EpochPlan(self.chunks, self.cfg.seed, epoch, shuffle=True)

    def batches_in(self, epoch: int) -> int:
        """Batches this worker (and every other) reads in `epoch` from the start or resume point."""
        return self._rows.get(epoch, 0) // self.batch

    def position(self, epoch: int, rows_done: int) -> dict[str, Any]:
        """Checkpointable position after every worker trained `rows_done` rows of its slice of `epoch` in this
        run: {"epoch", "consumed" (S-intervals), "chunks" (the layout's fingerprint)}."""
        done = self.consumed.get(epoch, [])
        consumed = self.plan(epoch).advance(done, self.world, self.batch, rows_done) if rows_done else done
        return {"epoch": epoch, "consumed": [list(iv) for iv in consumed], "chunks": self.chunks.fingerprint()}

    def close(self) -> None:
        """Stop the Ray Data execution (rows of epochs not trained, e.g. after `train.max_steps`)."""
        if self._tables is not None:
            self._tables.close()  # type: ignore[attr-defined]  # a generator
            self._tables = None

    def _open(self) -> Iterator[tuple[int, pa.Table]]:
        workers = max(1, self.cfg.num_workers // self.world)
        ds = build_stream(self.cfg, self.chunks, self.pieces, train=True, workers=workers, ordered=True,
                          filesystem=self.filesystem)
        tables = ds.iter_batches(batch_size=self.batch, batch_format="pyarrow", drop_last=False,
                                 prefetch_batches=self.cfg.prefetch_batches)
        return iter_epoch_batches(iter(tables))

    def batches(self, epoch: int, device: torch.device | str = "cpu", *, size_divisor: int = 1
                ) -> Iterator[Batch]:
        """The batches of `epoch` (collated on `device`); rows of an earlier epoch still in the stream are
        dropped, a batch of a later one is held for it."""
        if not self._rows.get(epoch):
            return
        if self._tables is None:
            self._tables = self._open()
        device = torch.device(device)
        left = self.batches_in(epoch)
        while left > 0:
            if self._held is not None:
                (ep, table), self._held = self._held, None
            else:
                nxt = next(self._tables, None)
                if nxt is None:
                    return
                ep, table = nxt
            if ep < epoch:
                continue
            if ep > epoch:
                self._held = (ep, table)
                return
            images, targets = table_to_samples(table)
            left -= 1
            yield collate(images, targets, size_divisor=size_divisor, device=device,
                          non_blocking=device.type == "cuda")
