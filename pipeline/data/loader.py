"""Shards -> Ray Data (decode + augment on CPU workers) -> padded batches on each training worker.

Driver (or job):
    ds = build_dataset(cfg.data, cfg.data.train_split, train=True, epoch_seed=start_epoch)
    trainer = TorchTrainer(..., datasets={"train": ds})
Training worker:
    shard = ray.train.get_dataset_shard("train")
    for batch in iter_batches(shard, cfg.data.batch_size, device, shuffle_buffer=cfg.data.shuffle_buffer):
        losses = model(batch.images, batch.targets)       # batch.masks: (B, H, W) True = padding
Without Ray (notebooks, the benchmark's baseline):
    loader = DataLoader(ShardDataset(cfg.data, "val", train=False), batch_size=2, collate_fn=collate_samples)

Data flow: `read_parquet` over `<shards>/<split>/part-*.parquet` (file order shuffled per epoch for training)
-> streaming repartition into blocks of `map_batch_size` rows -> `map_batches(decode_augment)` in Ray tasks of
1 CPU, at most `num_workers` at once -> rows of augmented uint8 CHW images + flat target columns
(`AUGMENTED_SCHEMA`) -> `iter_batches` on the training worker: local shuffle buffer, then `collate` (pad,
mask, normalise on the device after a uint8 copy), done here rather than by `iter_torch_batches`, which would
concatenate the per-image target tensors.

Epochs and seeds: Ray Data re-executes the dataset for every pass, and each completed execution advances the
dataset's execution index. The augmentation epoch is `epoch_seed + execution index`, so a dataset handed once
to a TorchTrainer augments differently in every epoch, reproducibly; after a resume at epoch k, build the
dataset with `epoch_seed=k`. (Any other completed execution of the same Dataset object, e.g. `count()`, also
advances the index.) An image's augmentation depends on (seed, epoch, image_id) only, not on the worker or
rank that processes it, so it is the same in `ShardDataset` and under any world size. Rank is not part of
the seed because Ray Data augments rows before `streaming_split` assigns them to ranks.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline import storage
from pipeline.data.collate import Batch, collate
from pipeline.data.config import AugmentConfig, DataConfig
from pipeline.data.transforms import DetectionTransform, build_transforms, prepare_sample, sample_seed

if TYPE_CHECKING:
    import ray.data

SHARD_COLUMNS = ["image_id", "width", "height", "image", "boxes", "labels", "iscrowd"]

AUGMENTED_SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("image", pa.binary()),                   # (3, height, width) uint8, C-order
    ("height", pa.int32()),                   # augmented image, before batch padding (= target "size")
    ("width", pa.int32()),
    ("orig_height", pa.int32()),
    ("orig_width", pa.int32()),
    ("boxes", pa.list_(pa.float32())),        # N*4 cxcywh normalised by (width, height)
    ("labels", pa.list_(pa.int64())),
    ("iscrowd", pa.list_(pa.int8())),
    ("scale_factor", pa.list_(pa.float32())),  # (sx, sy)
])


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


@functools.lru_cache(maxsize=8)
def _transform(aug: AugmentConfig, train: bool, eval_size: tuple[int, int]) -> DetectionTransform:
    return build_transforms(aug, train=train, eval_size=eval_size)


def samples_to_table(images: list[torch.Tensor], targets: list[dict[str, Any]]) -> pa.Table:
    """Augmented (image (3, h, w) uint8, target) pairs -> a table of `AUGMENTED_SCHEMA`, a row per image."""
    columns: dict[str, list[Any]] = {name: [] for name in AUGMENTED_SCHEMA.names}
    for image, t in zip(images, targets):
        columns["image_id"].append(t["image_id"])
        columns["image"].append(image.contiguous().numpy().tobytes())
        columns["height"].append(int(t["size"][0]))
        columns["width"].append(int(t["size"][1]))
        columns["orig_height"].append(int(t["orig_size"][0]))
        columns["orig_width"].append(int(t["orig_size"][1]))
        columns["boxes"].append(t["boxes"].reshape(-1).numpy())
        columns["labels"].append(t["labels"].numpy())
        columns["iscrowd"].append(t["iscrowd"].numpy().astype(np.int8))
        columns["scale_factor"].append(t["scale_factor"].numpy())
    return pa.table(columns, schema=AUGMENTED_SCHEMA)


def table_to_samples(table: pa.Table) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """Inverse of `samples_to_table`: ([(3, h, w) uint8 arrays], [target dicts of CPU tensors])."""
    cols = {name: table.column(name).to_pylist() for name in AUGMENTED_SCHEMA.names}
    images, targets = [], []
    for i in range(table.num_rows):
        h, w = cols["height"][i], cols["width"][i]
        images.append(np.frombuffer(cols["image"][i], dtype=np.uint8).reshape(3, h, w))
        targets.append({
            "boxes": torch.tensor(cols["boxes"][i], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(cols["labels"][i], dtype=torch.int64),
            "iscrowd": torch.tensor(cols["iscrowd"][i], dtype=torch.int64),
            "image_id": int(cols["image_id"][i]),
            "size": torch.tensor([h, w], dtype=torch.int64),
            "orig_size": torch.tensor([cols["orig_height"][i], cols["orig_width"][i]], dtype=torch.int64),
            "scale_factor": torch.tensor(cols["scale_factor"][i], dtype=torch.float32),
        })
    return images, targets


def _execution_index() -> int:
    """How many executions of this Dataset completed before the current one (0 outside Ray Data)."""
    from ray.data import DataContext

    return int(getattr(DataContext.get_current(), "_execution_idx", 0))


def decode_augment(table: pa.Table, *, aug: AugmentConfig, train: bool, eval_size: tuple[int, int], seed: int,
                   epoch_seed: int, drop_crowd: bool) -> pa.Table:
    """Ray Data map_batches UDF (CPU): shard rows (SHARD_COLUMNS) -> augmented rows (AUGMENTED_SCHEMA)."""
    transform = _transform(aug, train, tuple(eval_size))
    epoch = epoch_seed + _execution_index()
    images, targets = [], []
    for row in table.select(SHARD_COLUMNS).to_pylist():
        image, target = prepare_sample(row, transform, seed=seed, epoch=epoch, drop_crowd=drop_crowd)
        images.append(image)
        targets.append(target)
    return samples_to_table(images, targets)


def build_dataset(cfg: DataConfig, split: str, *, train: bool, epoch_seed: int = 0) -> ray.data.Dataset:
    """Streaming dataset of augmented rows (AUGMENTED_SCHEMA) for `split`.

    train=True: file order shuffled per epoch (seeded), the train augmentation of `cfg.augment`, crowd boxes
    dropped if `cfg.drop_crowd`. train=False: files in order, the eval pipeline, crowd boxes kept (flagged).
    """
    import ray.data

    files = shard_files(cfg, split)
    fs, _ = storage.get_pyarrow_fs(files[0])
    paths = [storage.split_uri(u)[1] for u in files]
    file_seed = sample_seed(cfg.seed, epoch_seed, -1) % 2**32
    shuffle = ray.data.FileShuffleConfig(seed=file_seed) if train else None
    ctx = ray.data.DataContext.get_current()
    saved, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        # Ray 2.60's default V2 Parquet reader adds a ListFiles task of ~3 s to every execution, i.e. every
        # epoch (measured here, 160 rows: 3-4 s per pass vs 0.2 s with V1); V1 also reads a task per file.
        ds = ray.data.read_parquet(paths, filesystem=fs, columns=SHARD_COLUMNS, shuffle=shuffle)
    finally:
        ctx.use_datasource_v2 = saved
    # A read block is a whole shard file (up to 128 MiB) and a map task takes whole blocks: cut them
    # (streaming, no shuffle) into `map_batch_size` rows so decode + augment spreads over all `num_workers`
    # and the first batch arrives after one small task, not after a whole shard.
    ds = ds.repartition(target_num_rows_per_block=cfg.map_batch_size)
    return ds.map_batches(
        decode_augment,  # type: ignore[arg-type]  # Ray types the UDF without keyword-only fn_kwargs
        batch_size=cfg.map_batch_size,
        batch_format="pyarrow",
        compute=ray.data.TaskPoolStrategy(size=cfg.num_workers),
        num_cpus=1,
        fn_kwargs={"aug": cfg.augment, "train": train, "eval_size": tuple(cfg.eval_size), "seed": cfg.seed,
                   "epoch_seed": epoch_seed, "drop_crowd": cfg.drop_crowd and train},
    )


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
