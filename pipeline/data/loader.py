"""Shards -> Ray Data (read + decode + augment on CPU workers) -> padded batches on each training worker.

Training (on each worker; see `pipeline/data/stream.py` and `pipeline/data/plan.py`):
    stream = TrainStream(cfg.data, chunks, rank=rank, world=world, batch=cfg.data.batch_size, first_epoch=e,
                         epochs=cfg.train.epochs, consumed=position["consumed"])
    for batch in stream.batches(epoch, device):
        losses = model(batch.images, batch.targets)       # batch.masks: (B, H, W) True = padding
Evaluation / prediction (driver builds, Ray Train or Ray Data splits over workers):
    ds = build_dataset(cfg.data, cfg.data.val_split, train=False)
    for batch in iter_batches(ray.train.get_dataset_shard("val"), 2, device): ...
Without Ray (notebooks, the benchmark's baseline):
    loader = DataLoader(ShardDataset(cfg.data, "val", train=False), batch_size=2, collate_fn=collate_samples)

Epochs and seeds: an image's augmentation depends on (seed, epoch, image_id) only, not on the worker or rank that
processes it, so it is the same in `ShardDataset` and under any world size. The epoch is carried by the rows
themselves (the plan's pieces), never read from Ray. Collate (pad, mask, normalise on the device after a uint8
copy) is done here rather than by `iter_torch_batches`, which would concatenate the per-image target tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline import storage
from pipeline.data.collate import Batch, collate
from pipeline.data.config import DataConfig
from pipeline.data.samples import AUGMENTED_SCHEMA, SHARD_COLUMNS, samples_to_table, table_to_samples
from pipeline.data.stream import build_stream, one_pass_pieces, scan_chunks
from pipeline.data.transforms import build_transforms, prepare_sample

__all__ = ["AUGMENTED_SCHEMA", "SHARD_COLUMNS", "ShardDataset", "build_dataset", "iter_batches", "samples_to_table",
           "shard_files", "table_to_samples"]

if TYPE_CHECKING:
    import ray.data

def shard_files(cfg: DataConfig, split: str) -> list[str]:
    """URIs of the split's shards: the manifest's file list for `split` if it has one (stale files of an
    earlier build are ignored), else `<shards>/<split>/part-*.parquet` sorted; a one-line error if none."""
    if not cfg.shards:
        raise ValueError("data.shards is empty: set it to the shard root URI (holding manifest.json and "
                         "<split>/part-*.parquet)")
    split_uri = storage.join(cfg.shards, split)
    manifest_uri = storage.join(cfg.shards, "manifest.json")
    listed = None
    if storage.exists(manifest_uri):
        listed = storage.read_json(manifest_uri).get("splits", {}).get(split, {}).get("files")
    if listed:
        files = [storage.join(cfg.shards, f) for f in listed]
    else:
        files = [u for u in storage.listdir(split_uri)
                 if u.rsplit("/", 1)[-1].startswith("part-") and u.endswith(".parquet")]
    if not files:
        raise FileNotFoundError(f"no shards at {split_uri}/part-*.parquet (split {split!r} of {cfg.shards})")
    return files


def build_dataset(cfg: DataConfig, split: str, *, train: bool, epoch_seed: int = 0) -> ray.data.Dataset:
    """Streaming dataset of one pass over `split`: augmented rows (AUGMENTED_SCHEMA), decoded by at most
    `cfg.num_workers` tasks at once.

    train=True: the epoch `epoch_seed`'s order of row groups and rows and its train augmentation, crowd boxes
    dropped if `cfg.drop_crowd` (training itself uses `TrainStream`, which spans epochs). train=False: row groups
    in file order, the eval pipeline, crowd boxes kept (flagged). Iterating the dataset again repeats the pass.
    """
    chunks = scan_chunks(shard_files(cfg, split))
    pieces = one_pass_pieces(chunks, seed=cfg.seed, epoch=epoch_seed, shuffle=train)
    return build_stream(cfg, chunks, pieces, train=train, workers=cfg.num_workers, ordered=False)


def iter_batches(data: Any, batch_size: int, device: torch.device | str | None = None, *,
                 size_divisor: int = 1, shuffle_buffer: int = 0, shuffle_seed: int | None = None,
                 drop_last: bool = False, prefetch_batches: int = 1) -> Iterator[Batch]:
    """Batches of a Ray `DataIterator` (e.g. `ray.train.get_dataset_shard("train")`) or `Dataset` of
    augmented rows: images (B, 3, H, W) normalised with 0 padding, masks (B, H, W) True = padding, targets a
    list of B dicts, all on `device`. `shuffle_buffer` > 0 enables Ray's local shuffle over that many rows."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device("cpu") if device is None else torch.device(device)
    tables: Iterable[pa.Table] = data.iter_batches(
        batch_size=batch_size, batch_format="pyarrow", drop_last=drop_last, prefetch_batches=prefetch_batches,
        local_shuffle_buffer_size=shuffle_buffer or None, local_shuffle_seed=shuffle_seed,
    )
    for table in tables:
        images, targets = table_to_samples(table)
        yield collate(images, targets, size_divisor=size_divisor, device=device,
                      non_blocking=device.type == "cuda")


class ShardDataset(torch.utils.data.Dataset):
    """Map-style dataset over the same shards and transforms, without Ray (notebooks, the benchmark baseline).

    Holds the split's rows (encoded images) in memory as one Arrow table. Items are (image (3, h, w) uint8,
    target dict) as in the Ray path; use `collate_samples` as the DataLoader's collate_fn. Call
    `set_epoch(e)` before creating each epoch's DataLoader iterator (workers copy the dataset).
    """

    def __init__(self, cfg: DataConfig, split: str, *, train: bool, epoch: int = 0) -> None:
        files = shard_files(cfg, split)
        fs, _ = storage.get_pyarrow_fs(files[0])
        tables = [pq.read_table(storage.split_uri(u)[1], filesystem=fs, columns=SHARD_COLUMNS) for u in files]
        self.table = pa.concat_tables(tables).combine_chunks()
        self.transform = build_transforms(cfg.augment, train=train, eval_size=cfg.eval_size)
        self.seed = cfg.seed
        self.epoch = epoch
        self.drop_crowd = cfg.drop_crowd and train

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.table.num_rows

    def row(self, index: int) -> Mapping[str, Any]:
        """The raw shard row `index` (columns SHARD_COLUMNS)."""
        return self.table.slice(index, 1).to_pylist()[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} rows")
        return prepare_sample(self.row(index), self.transform, seed=self.seed, epoch=self.epoch,
                              drop_crowd=self.drop_crowd)
