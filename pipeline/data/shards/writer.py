"""One shard: fetch a chunk of images, check that they decode, clean their boxes, write `part-XXXXX.parquet`.

`write_shard` runs in a Ray task of the builder (or as a plain function): it gets a small shard spec (an
image-id range and a fingerprint) and reads its images' records and boxes from the spill files itself, so no
record passes through the driver or the object store. After the Parquet file it writes a done record
(row count, sha256, per-shard counts) that lets a re-run skip the shard.
Image bytes are stored exactly as read (no re-encoding); they are checked by opening them with PIL and
decoding (JPEG in draft mode at 1/8 scale, which still reads the whole entropy stream, so truncation is caught).

Column types (the shard contract in ARCHITECTURE.md):
    image_id int64, file_name string, width int32, height int32, image binary,
    boxes list<list<float32>> (xywh absolute, COCO convention), labels list<int32> (0..C-1), iscrowd list<int8>,
    LVIS only: neg_category_ids list<int32>, not_exhaustive_category_ids list<int32> (labels, not source ids).
"""

from __future__ import annotations

import hashlib
import io
import posixpath
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline import storage
from pipeline.data.shards.coco_source import clean_annotations, image_candidates, map_category_list
from pipeline.data.shards.spill import read_range

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


def _records(spec: dict[str, Any], ctx: dict[str, Any], counts: Counter) -> list[dict[str, Any]]:
    """The shard's image records (sorted by image id, first of duplicated ids kept) joined with their boxes
    (source order), read from the spill files for the id range [spec lo, spec hi)."""
    imgs = read_range(list(ctx["image_spill"]), spec["lo"], spec["hi"])
    boxes = read_range(list(ctx["box_spill"]), spec["lo"], spec["hi"])
    if imgs is None or imgs.num_rows == 0:
        counts["orphan_annotation"] += 0 if boxes is None else boxes.num_rows
        return []
    ids = imgs["image_id"].to_numpy()
    first = np.ones(len(ids), bool)
    first[1:] = ids[1:] != ids[:-1]  # duplicates were counted on the driver
    imgs = imgs.filter(pa.array(first))
    ids = ids[first]
    cols = imgs.to_pydict()
    bids = boxes["image_id"].to_numpy() if boxes is not None else np.zeros(0, np.int64)
    starts, ends = np.searchsorted(bids, ids, "left"), np.searchsorted(bids, ids, "right")
    counts["orphan_annotation"] += len(bids) - int((ends - starts).sum())
    cat: list = []
    xywh: list = []
    ok: Any = []
    crowd: list = []
    if boxes is not None and boxes.num_rows:
        cat = boxes["category_id"].to_pylist()
        xywh = np.stack([boxes[k].to_numpy(zero_copy_only=False) for k in "xywh"], 1).tolist()  # (B, 4), NaN=bad
        ok = boxes["x"].is_valid().to_numpy(zero_copy_only=False)
        crowd = boxes["iscrowd"].to_numpy().tolist()
    records = []
    for i in range(len(ids)):
        anns = [{"bbox": xywh[j] if ok[j] else None, "category_id": cat[j], "iscrowd": crowd[j]}
                for j in range(starts[i], ends[i])]
        records.append({"image_id": int(ids[i]), "file_name": cols["file_name"][i], "width": cols["width"][i],
                        "height": cols["height"][i], "anns": anns, "neg_category_ids": cols["neg_category_ids"][i],
                        "not_exhaustive_category_ids": cols["not_exhaustive_category_ids"][i]})
    return records


def done_record_uri(ctx: dict[str, Any], index: int) -> str:
    return storage.join(ctx["done_uri"], f"part-{index:05d}.json")


def _reusable(spec: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any] | None:
    """The summary of a finished shard from an earlier run, if its done record matches this spec and the file
    still has the recorded row count and sha256; else None (the shard is written again)."""
    uri = done_record_uri(ctx, spec["index"])
    if not storage.exists(uri):
        return None
    try:
        rec = storage.read_json(uri)
        if rec.get("fingerprint") != spec["fingerprint"]:
            return None
        if rec["file"]:
            data = storage.read_bytes(storage.join(ctx["split_uri"], rec["file"]))
            if (hashlib.sha256(data).hexdigest() != rec["sha256"]
                    or pq.ParquetFile(io.BytesIO(data)).metadata.num_rows != rec["rows"]):
                return None
    except (OSError, ValueError, KeyError):
        return None
    return {**rec, "reused": True, "bytes_written": 0}


def write_shard(spec: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    """Write shard `spec["index"]` (images with spec lo <= image_id < spec hi), unless an identical one from
    an earlier run is still there (`ctx["resume"]`).

    spec: index, lo, hi (None: unbounded), num_images (in the source), fingerprint (of everything that decides
    the shard's content). ctx: images_uri, depth (from `probe_layout`), split_uri (folder of the parquet files),
    done_uri (folder of the per-shard done records), image_spill / box_spill (spill chunk URIs), label_of
    ({source id: label}), num_classes, lvis (bool), resume (bool). Returns {shard, file ("" when no image
    survived), rows, boxes, empty_images, counts, image_counts / instance_counts (per label), sha256, bytes,
    bytes_written, reused}; the same dict is written as the shard's done record after the file."""
    index = int(spec["index"])
    if ctx.get("resume") and (old := _reusable(spec, ctx)) is not None:
        return old
    counts: Counter = Counter()
    records = _records(spec, ctx, counts)
    fs, root = storage.get_fs(ctx["images_uri"])
    with ThreadPoolExecutor(FETCH_THREADS) as pool:
        datas = list(pool.map(lambda r: _fetch(fs, root, r["file_name"], ctx["depth"]), records))
    label_of: dict[int, int] = ctx["label_of"]
    schema = shard_schema(ctx["lvis"])
    cols: dict[str, list] = {name: [] for name in schema.names}
    image_counts = np.zeros(ctx["num_classes"], np.int64)
    instance_counts = np.zeros(ctx["num_classes"], np.int64)
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
        np.add.at(instance_counts, labels, 1)
        image_counts[sorted(set(labels))] += 1
        for key, value in (("image_id", rec["image_id"]), ("file_name", rec["file_name"]), ("width", w),
                           ("height", h), ("image", data), ("boxes", boxes), ("labels", labels),
                           ("iscrowd", crowd)):
            cols[key].append(value)
        if ctx["lvis"]:
            for key in LVIS_COLUMNS:
                cols[key].append(map_category_list(rec[key], label_of, counts))
    file, digest, data = "", "", b""
    if cols["image_id"]:
        file = shard_file_name(index)
        table = pa.Table.from_pydict(cols, schema=schema)
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=256,
                       compression={n: ("none" if n == "image" else "zstd") for n in schema.names})
        data = buf.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        storage.write_bytes(storage.join(ctx["split_uri"], file), data)
    summary = {"shard": index, "fingerprint": spec["fingerprint"], "file": file, "rows": len(cols["image_id"]),
               "boxes": num_boxes, "empty_images": empty, "counts": dict(counts),
               "image_counts": image_counts.tolist(), "instance_counts": instance_counts.tolist(),
               "sha256": digest, "bytes": len(data)}
    storage.write_json(done_record_uri(ctx, index), summary)  # after the file: a record means a whole file
    return {**summary, "reused": False, "bytes_written": len(data)}
