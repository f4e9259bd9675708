"""One shard: fetch a chunk of images, check that they decode, clean their boxes, write `part-XXXXX.parquet`.

`write_shard` is the Ray Data map function of the builder (one row in = one shard written + a summary row out)
and also runs as a plain function. Image bytes are stored exactly as read (no re-encoding); they are checked
by opening them with PIL and decoding (JPEG in draft mode at 1/8 scale, which still reads the whole entropy
stream, so truncation is caught).

Column types (the shard contract in ARCHITECTURE.md):
    image_id int64, file_name string, width int32, height int32, image binary,
    boxes list<list<float32>> (xywh absolute, COCO convention), labels list<int32> (0..C-1), iscrowd list<int8>,
    LVIS only: neg_category_ids list<int32>, not_exhaustive_category_ids list<int32> (labels, not source ids).
"""

from __future__ import annotations

import io
import json
import posixpath
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline import storage
from pipeline.data.shards.coco_source import clean_annotations, image_candidates, map_category_list

LVIS_COLUMNS = ("neg_category_ids", "not_exhaustive_category_ids")
FETCH_THREADS = 16


def shard_schema(lvis: bool) -> pa.Schema:
    fields = [
        ("image_id", pa.int64()), ("file_name", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
        ("image", pa.binary()), ("boxes", pa.list_(pa.list_(pa.float32()))), ("labels", pa.list_(pa.int32())),
        ("iscrowd", pa.list_(pa.int8())),
    ]
    if lvis:
        fields += [(c, pa.list_(pa.int32())) for c in LVIS_COLUMNS]
    return pa.schema(fields)


def shard_file_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def probe_layout(images_uri: str, file_names: list[str], max_probe: int = 20) -> int:
    """How many leading folders of `file_name` to drop to find images under `images_uri` (see
    `image_candidates`), from the first `max_probe` images. Raises FileNotFoundError if none is found."""
    if not file_names:
        return 0
    fs, root = storage.get_fs(images_uri)
    for fname in file_names[:max_probe]:
        for k, rel in enumerate(image_candidates(fname)):
            if fs.exists(posixpath.join(root, rel)):
                return k
    raise FileNotFoundError(
        f"none of the first {min(max_probe, len(file_names))} images was found under --images {images_uri!r} "
        f"(tried e.g. {image_candidates(file_names[0])})")


def _fetch(fs: Any, root: str, file_name: str, depth: int) -> bytes | str:
    """Bytes of one image, trying the probed layout first and then the other suffixes of its path.
    Returns an issue key ("missing_image" / "unreadable_image") instead of raising."""
    cands = image_candidates(file_name)
    order = [min(depth, len(cands) - 1)] + [k for k in range(len(cands)) if k != min(depth, len(cands) - 1)]
    for k in order:
        try:
            return fs.cat_file(posixpath.join(root, cands[k]))
        except FileNotFoundError:
            continue
        except Exception:  # noqa: BLE001 - permission / transport errors: counted, the build goes on
            return "unreadable_image"
    return "missing_image"


def decoded_size(data: bytes) -> tuple[int, int]:
    """(width, height) of encoded image bytes; raises if they do not decode."""
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        if im.format == "JPEG":
            im.draft(im.mode, (max(1, w // 8), max(1, h // 8)))
        im.load()
    return w, h


def write_shard(row: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    """Write shard `row["shard"]` from the JSON-encoded records in `row["payload"]`.

    ctx: images_uri, depth (from `probe_layout`), split_uri (folder of the parquet files), label_of
    ({source id: label}), lvis (bool). Returns {shard, file ("" when no image survived), rows, boxes,
    empty_images, counts (JSON of issue counts)}."""
    index = int(row["shard"])
    records = json.loads(row["payload"])
    fs, root = storage.get_fs(ctx["images_uri"])
    with ThreadPoolExecutor(FETCH_THREADS) as pool:
        datas = list(pool.map(lambda r: _fetch(fs, root, r["file_name"], ctx["depth"]), records))
    label_of: dict[int, int] = ctx["label_of"]
    schema = shard_schema(ctx["lvis"])
    cols: dict[str, list] = {name: [] for name in schema.names}
    counts: Counter = Counter()
    num_boxes = empty = 0
    for rec, data in zip(records, datas):
        if isinstance(data, str):
            counts[data] += 1
            continue
        try:
            w, h = decoded_size(data)
        except Exception:  # noqa: BLE001 - any decoder error means a corrupt file
            counts["corrupt_image"] += 1
            continue
        if rec["width"] and rec["height"] and (w, h) != (rec["width"], rec["height"]):
            counts["size_mismatch"] += 1
        boxes, labels, crowd = clean_annotations(rec["anns"], w, h, label_of, counts)
        num_boxes += len(boxes)
        empty += not boxes
        for key, value in (("image_id", rec["image_id"]), ("file_name", rec["file_name"]), ("width", w),
                           ("height", h), ("image", data), ("boxes", boxes), ("labels", labels),
                           ("iscrowd", crowd)):
            cols[key].append(value)
        if ctx["lvis"]:
            for key in LVIS_COLUMNS:
                cols[key].append(map_category_list(rec[key], label_of, counts))
    file = ""
    if cols["image_id"]:
        file = shard_file_name(index)
        table = pa.Table.from_pydict(cols, schema=schema)
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=256,
                       compression={n: ("none" if n == "image" else "zstd") for n in schema.names})
        storage.write_bytes(storage.join(ctx["split_uri"], file), buf.getvalue())
    return {"shard": index, "file": file, "rows": len(cols["image_id"]), "boxes": num_boxes,
            "empty_images": empty, "counts": json.dumps(dict(counts))}
