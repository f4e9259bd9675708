"""COCO-format source -> Parquet shards + manifest.json (the shard contract in ARCHITECTURE.md).

    manifest = build_shards("s3://raw/coco/annotations/instances_val2017.json", "s3://raw/coco/val2017",
                            "s3://shards/coco", split="val", rows_per_shard=1000)

Steps, with the driver's memory bounded by a small per-image index (the sorted unique image ids, 8 bytes an
image; ~14 MB for Objects365's 1.74M images):
1. `scan_source` streams the annotation file (ijson) into spill files under `<out>/_build/<split>/spill/`.
2. The sorted ids are cut into shards of `rows_per_shard` images; shard k covers an image-id range, and every
   range together covers all ids, so an annotation of an unknown image is counted once, by its range's task.
3. One Ray task per shard (at most 2 per CPU in flight) gets only its spec (range + fingerprint) and reads
   its rows from the spill files itself; it writes `<split>/part-%05d.parquet`, then a done record
   `_build/<split>/done/part-%05d.json` (rows, sha256, counts). Progress: images done, images/s, ETA.
4. Stale part files are removed, the manifest written last, the spill files deleted.

Resume (default): a shard whose done record has the same fingerprint (source sha256, image root, layout,
shard range, rows per shard, label map) and whose file still has the recorded row count and sha256 is not
written again, so a build killed midway and re-run ends with exactly the files of an uninterrupted build.
`rebuild=True` deletes the split's files and done records first. While a split is (re)built it is absent
from the manifest. Build splits one at a time (the manifest is read-modify-write).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import uuid
from collections import Counter
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.data.shards.coco_source import ISSUE_KEYS
from pipeline.data.shards.manifest import (
    Manifest,
    SplitInfo,
    format_summary,
    manifest_uri,
    read_manifest,
    with_category_counts,
    write_manifest,
)
from pipeline.data.shards.progress import BuildProgress
from pipeline.data.shards.stream_source import SourceIndex, scan_source
from pipeline.data.shards.writer import probe_layout, shard_schema, write_shard

SPEC_VERSION = 1  # bump when the bytes a shard spec produces change, so old done records stop matching


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


def _first_file_names(index: SourceIndex, k: int = 20) -> list[str]:
    """File names of the first `k` images by id (for `probe_layout`), from the first spill chunk."""
    from pipeline.data.shards.spill import read_range

    if not len(index.image_ids):
        return []
    hi = int(index.image_ids[min(k, len(index.image_ids) - 1)]) + 1
    t = read_range(list(index.image_spill), None, hi)
    return t["file_name"].to_pylist()[:k] if t is not None else []


def shard_specs(image_ids: np.ndarray, rows_per_shard: int, key: str) -> list[dict[str, Any]]:
    """Shard k = images image_ids[k*R:(k+1)*R] = the id range [lo, hi) (None: unbounded at the ends).
    `key` (everything else that decides a shard's bytes) goes into each spec's fingerprint."""
    specs = []
    n = len(image_ids)
    for k, start in enumerate(range(0, n, rows_per_shard)):
        end = min(start + rows_per_shard, n)
        lo = int(image_ids[start]) if k else None
        hi = int(image_ids[end]) if end < n else None
        fp = hashlib.sha256(json.dumps([key, k, lo, hi, end - start]).encode()).hexdigest()
        specs.append({"index": k, "lo": lo, "hi": hi, "num_images": end - start, "fingerprint": fp})
    return specs


def _run_specs(specs: list[dict[str, Any]], ctx: dict[str, Any], parallel: bool, progress: BuildProgress):
    """Yield each shard's summary as it finishes (Ray tasks, or in this process)."""
    if not parallel:
        for spec in specs:
            out = write_shard(spec, ctx)
            progress.update(spec["num_images"], out)
            yield out
        return
    import ray

    if not ray.is_initialized():
        ray.init()
    task = ray.remote(num_cpus=1, max_retries=2)(write_shard)
    ctx_ref = ray.put(ctx)
    limit = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending: dict[Any, dict[str, Any]] = {}
    todo = iter(specs)
    while True:
        while len(pending) < limit and (spec := next(todo, None)) is not None:
            pending[task.remote(spec, ctx_ref)] = spec
        if not pending:
            return
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            spec = pending.pop(ref)
            out = ray.get(ref)
            progress.update(spec["num_images"], out)
            yield out


def build_shards(annotations_uri: str, images_uri: str, out_uri: str, split: str = "train",
                 rows_per_shard: int = 1000, name: str | None = None, parallel: bool = True,
                 verbose: bool = True, resume: bool = True) -> Manifest:
    """Convert one split of a COCO-format source into `<out_uri>/<split>/part-*.parquet` and update
    `<out_uri>/manifest.json`. Returns the updated manifest.

    annotations_uri: the instances JSON (COCO 2017, Objects365 v2 or LVIS v1 layout), streamed.
    images_uri: root that the JSON's file names (or LVIS coco_url's last two parts) are relative to.
    parallel: one Ray task per shard (True) or a plain loop in this process (same output).
    resume: keep shards an earlier run of the same build finished (False: rebuild the split from scratch).
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

    split_uri = storage.join(out_uri, split)
    work_uri = storage.join(out_uri, "_build", split)
    fs, split_path = storage.get_fs(split_uri)
    work_fs, work_path = storage.get_fs(work_uri)
    if not resume and work_fs.exists(work_path):
        work_fs.rm(work_path, recursive=True)
    spill_uri = storage.join(work_uri, "spill")
    if work_fs.exists(storage.get_fs(spill_uri)[1]):
        work_fs.rm(storage.get_fs(spill_uri)[1], recursive=True)

    source = scan_source(annotations_uri, spill_uri, verbose=verbose)
    depth = probe_layout(images_uri, _first_file_names(source))
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
    if not resume:
        for old in fs.glob(f"{split_path}/part-*.parquet"):
            fs.rm(old)

    label_of = source.label_of()
    key = json.dumps([SPEC_VERSION, source.sha256, images_uri, depth, rows_per_shard, lvis,
                      sorted(label_of.items())])
    specs = shard_specs(source.image_ids, rows_per_shard, key)
    ctx = {"images_uri": images_uri, "depth": depth, "split_uri": split_uri,
           "done_uri": storage.join(work_uri, "done"), "image_spill": source.image_spill,
           "box_spill": source.box_spill, "label_of": label_of, "num_classes": len(categories), "lvis": lvis,
           "resume": resume}
    progress = BuildProgress(len(source.image_ids), split, enabled=verbose)
    summaries = sorted(_run_specs(specs, ctx, parallel, progress), key=lambda s: int(s["shard"]))
    line = progress.close()

    keep = {s["file"] for s in summaries if s["file"]}
    fs.invalidate_cache(split_path)  # the files were written by other processes
    for old in fs.glob(f"{split_path}/part-*.parquet*"):  # older builds' extra parts, killed writes' temp files
        if old.rsplit("/", 1)[-1] not in keep:
            fs.rm(old)

    counts: Counter = Counter({k: 0 for k in ISSUE_KEYS})
    counts.update(source.counts)
    image_counts = np.zeros(len(categories), np.int64)
    instance_counts = np.zeros(len(categories), np.int64)
    for s in summaries:
        counts.update(s["counts"])
        image_counts += np.asarray(s["image_counts"], np.int64)
        instance_counts += np.asarray(s["instance_counts"], np.int64)
    info = SplitInfo(
        num_images=sum(int(s["rows"]) for s in summaries), num_boxes=sum(int(s["boxes"]) for s in summaries),
        num_empty_images=sum(int(s["empty_images"]) for s in summaries),
        num_shards=len(keep), rows_per_shard=rows_per_shard,
        files=tuple(f"{split}/{s['file']}" for s in summaries if s["file"]),
        source={"annotations": annotations_uri, "images": images_uri, "sha256": source.sha256},
        counts={k: int(counts[k]) for k in ISSUE_KEYS},
        image_counts=tuple(int(v) for v in image_counts), instance_counts=tuple(int(v) for v in instance_counts),
    )
    manifest = with_category_counts(manifest.with_split(split, info))
    write_manifest(out_uri, manifest)  # last: a manifest entry means every listed file is whole
    work_fs.rm(storage.get_fs(spill_uri)[1], recursive=True)
    if verbose:
        print(format_summary(manifest, split))
        print(line)
        print(f"wrote {info.num_shards} shard file(s) to {split_uri} and {manifest_uri(out_uri)}")
    return manifest
