"""Augmented samples <-> Arrow rows: what decode tasks hand to training workers through the object store.

    table = samples_to_table(images, targets, epoch=3)       # in a decode task
    images, targets = table_to_samples(table)                # on the training worker: images are zero-copy views

Images travel as raw (3, h, w) uint8 bytes; `table_to_samples` maps them out of the Arrow buffer without copying
(the one copy is into the padded batch in `collate`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

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
    ("epoch", pa.int32()),                    # the augmentation epoch of the row
])


def samples_to_table(images: list[torch.Tensor], targets: list[dict[str, Any]], epoch: int = 0) -> pa.Table:
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
        columns["epoch"].append(epoch)
    return pa.table(columns, schema=AUGMENTED_SCHEMA)


def binary_views(column: pa.ChunkedArray | pa.Array) -> list[np.ndarray]:
    """The values of a binary column as read-only uint8 NumPy views of the Arrow buffers (no copy)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    out: list[np.ndarray] = []
    for arr in chunks:
        if arr.null_count:
            raise ValueError(f"binary column has {arr.null_count} null values; expected none")
        offset_type = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
        _, offsets_buf, data_buf = arr.buffers()
        offsets = np.frombuffer(offsets_buf, dtype=offset_type)[arr.offset:arr.offset + len(arr) + 1]
        data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
        out.extend(data[offsets[i]:offsets[i + 1]] for i in range(len(arr)))
    return out


def table_to_samples(table: pa.Table) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """Inverse of `samples_to_table`: ([(3, h, w) uint8 arrays, read-only views], [target dicts of CPU tensors])."""
    names = [n for n in AUGMENTED_SCHEMA.names if n not in ("image", "epoch")]
    cols = {name: table.column(name).to_pylist() for name in names}
    raw = binary_views(table.column("image"))
    images, targets = [], []
    for i in range(table.num_rows):
        h, w = cols["height"][i], cols["width"][i]
        images.append(raw[i].reshape(3, h, w))
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
