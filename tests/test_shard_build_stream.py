"""Streaming conversion: annotation JSON and images read from s3:// (moto's server over HTTP) in bounded
memory; per-category counts in the manifest against a hand count; odd key orders and bad records."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import storage
from pipeline.data.shards import build_shards, category_image_counts, read_manifest, scan_source
from pipeline.data.shards.manifest import with_category_counts

_TRACED_SCAN = """
import json, sys, tracemalloc
from pipeline.data.shards import scan_source
scan_source(sys.argv[1], sys.argv[3] + "-warm")  # imports (s3fs, botocore) outside the traced scan
tracemalloc.start()
index = scan_source(sys.argv[2], sys.argv[3])
print(json.dumps([tracemalloc.get_traced_memory()[1], index.image_ids.tolist(), index.num_boxes_in_source]))
"""


def _jpeg(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (120, 30, 200)).save(buf, "JPEG")
    return buf.getvalue()


def _hand_source(root) -> tuple[str, str]:
    """5 image entries (one a duplicate id), categories 3/7/9 = labels 0/1/2, annotations first (LVIS's key
    order) and out of image order, with a dropped box of each kind and orphans below, between and above ids."""
    images = root / "images"
    images.mkdir(parents=True)
    for name, size in (("a.jpg", (100, 80)), ("b.jpg", (64, 64)), ("c.jpg", (50, 40)), ("d.jpg", (30, 30))):
        (images / name).write_bytes(_jpeg(*size))
    doc = {
        "annotations": [
            {"id": 1, "image_id": 40, "category_id": 7, "bbox": [1, 1, 10, 10]},
            {"id": 2, "image_id": 10, "category_id": 3, "bbox": [0, 0, 20, 20], "iscrowd": 1},
            {"id": 3, "image_id": 10, "category_id": 3, "bbox": [90, 70, 20, 20]},   # clipped
            {"id": 4, "image_id": 10, "category_id": 9, "bbox": [5, 5, 5, 5]},
            {"id": 5, "image_id": 20, "category_id": 7, "bbox": [5, 5, -5, 5]},       # nonpositive: dropped
            {"id": 6, "image_id": 20, "category_id": 8, "bbox": [5, 5, 5, 5]},        # unknown category
            {"id": 7, "image_id": 20, "category_id": 7, "bbox": [2, 2, 3, "x"]},      # malformed
            {"id": 8, "image_id": 30, "category_id": 9, "bbox": [1, 1, 2, 2]},
            {"id": 9, "image_id": 30, "category_id": 9, "bbox": [3, 3, 2, 2]},
            {"id": 10, "image_id": 25, "category_id": 3, "bbox": [1, 1, 1, 1]},       # orphan between ids
            {"id": 11, "image_id": 5, "category_id": 3, "bbox": [1, 1, 1, 1]},        # orphan below
            {"id": 12, "image_id": 99, "category_id": 3, "bbox": [1, 1, 1, 1]},       # orphan above
            "not an annotation",                                                      # orphan (not an object)
            {"id": 13, "image_id": 40, "category_id": 3, "bbox": [100, 100, 5, 5]},   # outside: dropped
            {"id": 14, "image_id": 10, "category_id": 7, "bbox": [3, 3, 4, 4]},
        ],
        "images": [
            {"id": 30, "file_name": "c.jpg", "width": 50, "height": 40},
            {"id": 10, "file_name": "a.jpg", "width": 100, "height": 80},
            {"id": 40, "file_name": "d.jpg", "width": 30, "height": 30},
            {"id": 20, "file_name": "b.jpg", "width": 64, "height": 64},
            {"id": 30, "file_name": "b.jpg", "width": 64, "height": 64},              # duplicate id: skipped
            {"file_name": "b.jpg"},                                                    # malformed
        ],
        "info": {"description": "hand"},
        "categories": [{"id": 9, "name": "nine"}, {"id": 3, "name": "three"}, {"id": 7, "name": "seven"}],
    }
    (root / "ann.json").write_text(json.dumps(doc))
    return str(root / "ann.json"), str(images)


def test_hand_counted_categories_and_records(tmp_path):
    ann, images = _hand_source(tmp_path / "src")
    out = str(tmp_path / "out")
    m = build_shards(ann, images, out, "train", rows_per_shard=2, parallel=False, verbose=False)
    info = m.splits["train"]
    # labels: 3 -> 0, 7 -> 1, 9 -> 2. Kept boxes: image 10: 3,3,9,7; image 20: none; 30: 9,9; 40: 7.
    assert info.instance_counts == (2, 2, 3) and info.image_counts == (1, 2, 2)
    assert [(c["name"], c["image_count"], c["instance_count"]) for c in read_manifest(out).categories] == [
        ("three", 1, 2), ("seven", 2, 2), ("nine", 2, 3)]
    assert category_image_counts(read_manifest(out)) == [1, 2, 2]
    with pytest.raises(ValueError, match="split 'val' is not in the manifest"):
        category_image_counts(m, "val")
    assert {k: v for k, v in info.counts.items() if v} == {
        "duplicate_image": 1, "malformed_image": 1, "orphan_annotation": 4, "nonpositive_box": 1,
        "unknown_category": 1, "malformed_box": 1, "outside_box": 1, "clipped_box": 1}
    assert m.dataset == "hand" and info.num_images == 4 and info.num_boxes == 7 and info.num_shards == 2
    rows = pq.read_table([os.path.join(out, f) for f in info.files]).to_pylist()
    assert [r["image_id"] for r in rows] == [10, 20, 30, 40]
    assert rows[0]["labels"] == [0, 0, 2, 1] and rows[0]["iscrowd"] == [1, 0, 0, 0]  # source order of boxes
    assert rows[0]["boxes"][1] == [90, 70, 10, 10] and rows[2]["file_name"] == "c.jpg"  # first of the dup ids
    assert rows[1]["boxes"] == [] and rows[3]["labels"] == [1]


def test_not_coco_and_invalid_json(tmp_path):
    (tmp_path / "trunc.json").write_text('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [')
    with pytest.raises(ValueError, match="are not valid JSON"):
        scan_source(str(tmp_path / "trunc.json"), str(tmp_path / "spill"))
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"missing list\(s\) \['images', 'annotations', 'categories'\]"):
        scan_source(str(tmp_path / "list.json"), str(tmp_path / "spill"))
    (tmp_path / "obj.json").write_text('{"images": {}, "annotations": [], "categories": [{"id": 1}]}')
    with pytest.raises(ValueError, match=r"missing list\(s\) \['images'\]"):
        scan_source(str(tmp_path / "obj.json"), str(tmp_path / "spill"))


def test_streams_o365_layout_from_s3(s3_bucket, tmp_path):
    """Objects365 names (images/v1/patchN/...) against the download layout (patchN/...), all on s3://. The
    JSON (~17 MB: 20k boxes with polygons) is scanned with far less Python memory than its size."""
    src = f"{s3_bucket}/raw/o365"
    images, anns, cats = [], [], [{"id": c, "name": f"obj{c}"} for c in range(1, 6)]
    for i in range(12):
        rel = f"patch{i // 5}/objects365_v1_{i + 1:08d}.jpg"
        storage.write_bytes(f"{src}/images/{rel}", _jpeg(80, 60))
        images.append({"id": i + 1, "file_name": f"images/v1/{rel}", "width": 80, "height": 60})
    for k in range(20_000):
        i = (k * 7) % 12  # interleaved over images
        anns.append({"id": k + 1, "image_id": i + 1, "category_id": 1 + k % 5, "iscrowd": 0,
                     "bbox": [k % 40, k % 30, 10.5, 7.25], "area": 76.125,
                     "segmentation": [[v + 0.5 for v in range(120)]]})
    raw = json.dumps({"images": images, "annotations": anns, "categories": cats}).encode()
    storage.write_bytes(f"{src}/zhiyuan_objv2_train.json", raw)
    del anns

    tiny, _ = _hand_source(tmp_path / "tiny")
    storage.write_bytes(f"{src}/tiny.json", Path(tiny).read_bytes())
    # In a child process: moto serves from this one, and tracemalloc would count the server's copies too.
    child = subprocess.run([sys.executable, "-c", _TRACED_SCAN, f"{src}/tiny.json",
                            f"{src}/zhiyuan_objv2_train.json", f"{s3_bucket}/spill"],
                           capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert child.returncode == 0, child.stderr[-2000:]
    peak, ids, num_boxes = json.loads(child.stdout.strip().splitlines()[-1])
    assert len(raw) > 15 * 2**20 and peak < len(raw) / 2, (len(raw), peak)  # streamed (json.load: ~6x the size)
    assert ids == list(range(1, 13)) and num_boxes == 20_000

    out = f"{s3_bucket}/shards/o365"
    m = build_shards(f"{src}/zhiyuan_objv2_train.json", f"{src}/images", out, "train", rows_per_shard=5,
                     parallel=False, verbose=False)
    info = m.splits["train"]
    assert m.source_format == "objects365" and info.num_images == 12 and info.num_boxes == 20_000
    assert set(info.counts.values()) == {0} and info.num_shards == 3
    assert info.instance_counts == (4000,) * 5 and info.image_counts == (12,) * 5
    assert read_manifest(out) == m and m == with_category_counts(m)
    fs, path = storage.get_fs(out)
    assert not fs.exists(f"{path}/_build/train/spill")
    table = pq.read_table(f"{path}/train", filesystem=fs)
    rows = sorted(table.to_pylist(), key=lambda r: r["image_id"])
    assert [r["file_name"] for r in rows] == [im["file_name"] for im in images]
    assert rows[3]["image"] == storage.read_bytes(f"{src}/images/patch0/objects365_v1_00000004.jpg")
    want = [[float((k) % 40), float(k % 30), 10.5, 7.25] for k in range(20_000) if (k * 7) % 12 == 3]
    assert rows[3]["boxes"] == want  # boxes of one image in source order, exact (representable in float32)
