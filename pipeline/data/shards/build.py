"""COCO-format source -> Parquet shards + manifest.json (the shard contract in ARCHITECTURE.md).

    manifest = build_shards("s3://raw/coco/annotations/instances_val2017.json", "s3://raw/coco/val2017",
                            "s3://shards/coco", split="val", rows_per_shard=1000)

Parallelism: the driver parses the annotation file and cuts the image records (sorted by image id) into
chunks of `rows_per_shard`; Ray Data maps `write_shard` over the chunks (`from_items` with one block per
chunk, so up to one task per CPU), each task fetching its images with a thread pool and writing one Parquet
file. Ray Data shows its own progress bar (one tick per shard). Writing the files inside the map, rather than
with `Dataset.write_parquet`, gives fixed file names and exact rows per file, and returns the per-shard issue
counts in the same pass.

Re-runs: file names are deterministic (`<out>/<split>/part-00000.parquet`, ...). Before writing, the split is
removed from the manifest and its old `part-*.parquet` files are deleted; the manifest entry is written last.
So a re-run never duplicates rows, and a build that dies midway leaves a split absent from the manifest
rather than half-listed. Build splits one at a time (the manifest is read-modify-write).
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from collections import Counter

from pipeline import storage
from pipeline.data.shards.coco_source import ISSUE_KEYS, load_coco_source
from pipeline.data.shards.manifest import (
    Manifest,
    SplitInfo,
    format_summary,
    manifest_uri,
    read_manifest,
    write_manifest,
)
from pipeline.data.shards.writer import probe_layout, shard_schema, write_shard


def _check_categories(existing: Manifest, categories: list[dict], split: str) -> None:
    old = [(c["id"], c["name"]) for c in existing.categories]
    new = [(c["id"], c["name"]) for c in categories]
    if old != new:
        diff = next(((i, a, b) for i, (a, b) in enumerate(zip(old, new)) if a != b), (min(len(old), len(new)),))
        raise ValueError(f"split {split!r} has categories (id, name) that differ from those already in the "
                         f"manifest ({len(new)} vs {len(old)}, first difference at label {diff[0]}); "
                         "use another --out")


def _check_writable(out_uri: str) -> None:
    """Fail on the driver, in one line, when the output cannot be written (no bucket, no permission)."""
    probe = storage.join(out_uri, f".write-probe-{uuid.uuid4().hex[:8]}")
    try:
        storage.write_bytes(probe, b"")
        storage.remove(probe)
    except Exception as e:  # noqa: BLE001 - any transport / permission error becomes one readable line
        raise OSError(f"cannot write to --out {out_uri!r}: {type(e).__name__}: {e}") from e


def build_shards(annotations_uri: str, images_uri: str, out_uri: str, split: str = "train",
                 rows_per_shard: int = 1000, name: str | None = None, parallel: bool = True,
                 verbose: bool = True) -> Manifest:
    """Convert one split of a COCO-format source into `<out_uri>/<split>/part-*.parquet` and update
    `<out_uri>/manifest.json`. Returns the updated manifest.

    annotations_uri: the instances JSON (COCO 2017, Objects365 v2 or LVIS v1 layout).
    images_uri: root that the JSON's file names (or LVIS coco_url's last two parts) are relative to.
    parallel: Ray Data (True) or a plain loop in this process (same output).
    Raises FileNotFoundError / ValueError (one line) for a missing or non-COCO annotation file, an image root
    with none of the images, or categories that differ from the splits already in `out_uri`."""
    if not isinstance(rows_per_shard, int) or rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be a positive integer, got {rows_per_shard!r}")
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", split or ""):
        raise ValueError(f"split must be a plain name like 'train' (letters, digits, _ . -), got {split!r}")
    storage.check_reachable(annotations_uri)
    if not storage.exists(annotations_uri):
        raise FileNotFoundError(f"annotations file not found: {annotations_uri!r}")
    _check_writable(out_uri)

    source = load_coco_source(annotations_uri)
    depth = probe_layout(images_uri, [r["file_name"] for r in source.records])
    categories = [c.to_dict() for c in source.categories]
    lvis = source.is_lvis
    schema = shard_schema(lvis)
    manifest = Manifest(dataset=name or source.name, source_format=source.source_format,
                        categories=tuple(categories), columns={f.name: str(f.type) for f in schema})
    if storage.exists(manifest_uri(out_uri)):
        existing = read_manifest(out_uri)
        _check_categories(existing, categories, split)
        manifest = existing.with_split(split, None)
        if name:
            manifest = dataclasses.replace(manifest, dataset=name)
        if manifest.columns != {f.name: str(f.type) for f in schema}:
            raise ValueError(f"split {split!r} ({source.source_format}) has other columns than the splits "
                             f"already in {out_uri!r}; use another --out")
        write_manifest(out_uri, manifest)  # the split is absent while it is rebuilt

    split_uri = storage.join(out_uri, split)
    fs, split_path = storage.get_fs(split_uri)
    for old in sorted(fs.glob(f"{split_path}/part-*.parquet")):
        fs.rm(old)

    chunks = [source.records[i:i + rows_per_shard] for i in range(0, len(source.records), rows_per_shard)]
    items = [{"shard": k, "payload": json.dumps(chunk)} for k, chunk in enumerate(chunks)]
    ctx = {"images_uri": images_uri, "depth": depth, "split_uri": split_uri, "label_of": source.label_of(),
           "lvis": lvis}
    if not items:
        summaries = []
    elif parallel:
        import ray

        ds = ray.data.from_items(items, override_num_blocks=len(items))
        summaries = ds.map(write_shard, fn_kwargs={"ctx": ctx}).take_all()
    else:
        summaries = [write_shard(item, ctx) for item in items]
    summaries = sorted(summaries, key=lambda s: int(s["shard"]))
    fs.invalidate_cache(split_path)  # the files were written by other processes

    counts: Counter = Counter({k: 0 for k in ISSUE_KEYS})
    counts.update(source.counts)
    for s in summaries:
        counts.update(json.loads(s["counts"]))
    info = SplitInfo(
        num_images=sum(int(s["rows"]) for s in summaries), num_boxes=sum(int(s["boxes"]) for s in summaries),
        num_empty_images=sum(int(s["empty_images"]) for s in summaries),
        num_shards=sum(1 for s in summaries if s["file"]), rows_per_shard=rows_per_shard,
        files=tuple(f"{split}/{s['file']}" for s in summaries if s["file"]),
        source={"annotations": annotations_uri, "images": images_uri, "sha256": source.sha256},
        counts={k: int(counts[k]) for k in ISSUE_KEYS},
    )
    manifest = manifest.with_split(split, info)
    write_manifest(out_uri, manifest)
    if verbose:
        print(format_summary(manifest, split))
        print(f"wrote {info.num_shards} shard file(s) to {split_uri} and {manifest_uri(out_uri)}")
    return manifest
