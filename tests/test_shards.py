"""Shard builder: bad input counted (never silent, never fatal), labels mapped right, re-runs idempotent."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.data.shards import ISSUE_KEYS, build_shards, clean_annotations, read_manifest, shard_schema
from pipeline.data.shards.coco_source import image_candidates
from pipeline.data.synthetic import SyntheticConfig, generate_dataset


def _job_main(name: str):
    """`main` of jobs/<name>.py, loaded by path (jobs/ is scripts, not a package)."""
    jobs = str(Path(__file__).parents[1] / "jobs")
    sys.path.insert(0, jobs)  # for `import _bootstrap`
    try:
        spec = importlib.util.spec_from_file_location(f"job_{name}", f"{jobs}/{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = [p for p in sys.path if p != jobs]
    return module.main


def _table(root, split="train"):
    files = sorted(os.listdir(os.path.join(root, split)))
    return pq.read_table([os.path.join(root, split, f) for f in files]) if files else None, files


def test_clean_annotations_counts_every_case():
    label_of = {1: 0, 7: 1}
    anns = [
        {"bbox": [10, 10, 20, 30], "category_id": 7, "iscrowd": 0},   # kept
        {"bbox": [5, 5, -4, 10], "category_id": 1},                   # negative width
        {"bbox": [5, 5, 10, 0], "category_id": 1},                    # zero height
        {"bbox": [90, -5, 20, 20], "category_id": 1, "iscrowd": 1},   # clipped to (90, 0, 10, 15), crowd kept
        {"bbox": [120, 10, 5, 5], "category_id": 1},                  # entirely outside
        {"bbox": [1, 1, 5, 5], "category_id": 3},                     # unknown category
        {"bbox": [1, 1, float("nan"), 5], "category_id": 1},          # malformed
        {"bbox": [1, 1, 5], "category_id": 1},                        # malformed
        {"category_id": 1},                                           # malformed
    ]
    counts: Counter = Counter()
    boxes, labels, crowd = clean_annotations(anns, 100, 80, label_of, counts)
    assert boxes == [[10, 10, 20, 30], [90, 0, 10, 15]] and labels == [1, 0] and crowd == [0, 1]
    assert counts == Counter(nonpositive_box=2, clipped_box=1, outside_box=1, unknown_category=1, malformed_box=3)


def test_image_candidates():
    assert image_candidates("images/v1/patch8/x.jpg") == ["images/v1/patch8/x.jpg", "v1/patch8/x.jpg",
                                                          "patch8/x.jpg", "x.jpg"]


@pytest.fixture()
def broken_source(tmp_path):
    """A 16-image coco-style source with a truncated JPEG, a non-image file, a missing image, a negative-width
    box, a box partly outside its image and an unknown category id (each on a different image)."""
    ds = generate_dataset(str(tmp_path / "src"), SyntheticConfig(images=16, val_images=2, classes=4, seed=5,
                                                                  png_fraction=0.0, empty_fraction=0.0))
    ann_path, img_root = ds.splits["train"].annotations, ds.splits["train"].images
    with open(ann_path) as f:
        doc = json.load(f)
    ims = doc["images"]
    by_image = {im["id"]: [a for a in doc["annotations"] if a["image_id"] == im["id"] and not a["iscrowd"]]
                for im in ims}
    path = {im["id"]: os.path.join(img_root, im["file_name"]) for im in ims}
    truncated, garbage, missing = ims[0]["id"], ims[1]["id"], ims[2]["id"]
    with open(path[truncated], "rb") as f:
        data = f.read()
    with open(path[truncated], "wb") as f:
        f.write(data[: len(data) // 2])
    with open(path[garbage], "wb") as f:
        f.write(b"this is not an image" * 50)
    os.remove(path[missing])
    negw, outside, unknown = (by_image[im["id"]][0] for im in ims[3:6])
    negw["bbox"][2] = -negw["bbox"][2]
    im5 = ims[4]
    outside["bbox"][0] = im5["width"] - outside["bbox"][2] / 2  # half of the box sticks out on the right
    unknown["category_id"] = 999
    with open(ann_path, "w") as f:
        json.dump(doc, f)
    return {"ann": ann_path, "images": img_root, "doc": doc, "bad_images": {truncated, garbage, missing},
            "dropped": {negw["id"], unknown["id"]}, "clipped": outside["id"], "ds": ds}


def _expected_rows(src):
    """image_id -> (boxes, labels, iscrowd) as the builder should write them."""
    doc = src["doc"]
    label_of = {c["id"]: i for i, c in enumerate(sorted(doc["categories"], key=lambda c: c["id"]))}
    widths = {im["id"]: im["width"] for im in doc["images"]}
    out = {im["id"]: ([], [], []) for im in doc["images"] if im["id"] not in src["bad_images"]}
    for a in doc["annotations"]:
        if a["image_id"] not in out or a["id"] in src["dropped"]:
            continue
        x, y, w, h = a["bbox"]
        if a["id"] == src["clipped"]:
            w = widths[a["image_id"]] - x
        out[a["image_id"]][0].append(pytest.approx([x, y, w, h], abs=1e-3))
        out[a["image_id"]][1].append(label_of[a["category_id"]])
        out[a["image_id"]][2].append(a["iscrowd"])
    return out


def test_bad_input_counted_rest_intact(broken_source, tmp_path, ray_local, capsys):
    out = str(tmp_path / "shards")
    m = build_shards(broken_source["ann"], broken_source["images"], out, "train", rows_per_shard=5)
    expected_counts = {k: 0 for k in ISSUE_KEYS}
    expected_counts.update(corrupt_image=2, missing_image=1, nonpositive_box=1, clipped_box=1, unknown_category=1)
    info = m.splits["train"]
    assert info.counts == expected_counts
    assert read_manifest(out).splits["train"].counts == expected_counts
    printed = capsys.readouterr().out
    assert "corrupt_image                     2  <-" in printed and "unknown_category" in printed
    table, files = _table(out)
    assert files == [f"part-0000{i}.parquet" for i in range(4)]  # 16 source images in chunks of 5
    assert list(info.files) == [f"train/{f}" for f in files] and info.num_shards == 4
    assert table.schema == shard_schema(lvis=False)
    expected = _expected_rows(broken_source)
    rows = table.to_pylist()
    assert [r["image_id"] for r in rows] == sorted(expected) and info.num_images == 13
    for r in rows:
        boxes, labels, crowd = expected[r["image_id"]]
        assert r["boxes"] == boxes and r["labels"] == labels and r["iscrowd"] == crowd
        with open(os.path.join(broken_source["images"], r["file_name"]), "rb") as f:
            assert r["image"] == f.read()  # bytes as stored in the source, not re-encoded
    assert info.num_boxes == sum(len(v[0]) for v in expected.values())
    cats = m.categories
    assert [c["label"] for c in cats] == [0, 1, 2, 3] and [c["id"] for c in cats] == sorted(c["id"] for c in cats)
    assert info.source["sha256"] and m.split_sizes == {"train": 13}


def test_rerun_does_not_duplicate(broken_source, tmp_path, ray_local):
    out = str(tmp_path / "shards")
    build_shards(broken_source["ann"], broken_source["images"], out, "train", rows_per_shard=5, verbose=False)
    first, _ = _table(out)
    m = build_shards(broken_source["ann"], broken_source["images"], out, "train", rows_per_shard=5,
                     parallel=False, verbose=False)  # the serial path writes the same files
    again, files = _table(out)
    assert again.equals(first) and len(files) == 4
    val = broken_source["ds"].splits["val"]
    build_shards(val.annotations, val.images, out, "val", parallel=False, verbose=False)
    m = build_shards(broken_source["ann"], broken_source["images"], out, "train", rows_per_shard=100,
                     parallel=False, verbose=False)
    once, files = _table(out)
    assert files == ["part-00000.parquet"] and once.equals(first)  # old part-00001..3 are gone
    assert m.split_sizes == {"train": 13, "val": 2} and read_manifest(out).split_sizes == {"train": 13, "val": 2}


def test_o365_and_lvis_sources(tmp_path):
    o365 = generate_dataset(str(tmp_path / "o365"), SyntheticConfig(images=6, val_images=0, classes=5,
                                                                    style="o365", splits=("train",)))
    src = o365.splits["train"]
    m = build_shards(src.annotations, src.images, str(tmp_path / "so"), parallel=False, verbose=False)
    assert m.source_format == "objects365" and m.splits["train"].num_images == 6
    assert m.splits["train"].counts["missing_image"] == 0
    assert [c["name"] for c in m.categories] == sorted(c["name"] for c in m.categories)

    lvis = generate_dataset(str(tmp_path / "lvis"), SyntheticConfig(images=40, val_images=0, classes=6,
                                                                    style="lvis", seed=2, splits=("train",)))
    src = lvis.splits["train"]
    out = str(tmp_path / "sl")
    m = build_shards(src.annotations, src.images, out, rows_per_shard=16, parallel=False, verbose=False)
    assert m.source_format == "lvis" and m.splits["train"].num_images == 40
    assert {c["frequency"] for c in read_manifest(out).categories} == {"r", "c", "f"}
    table, _ = _table(out)
    assert table.schema == shard_schema(lvis=True)
    with open(src.annotations) as f:
        doc = json.load(f)
    label_of = {c["id"]: c["label"] for c in m.categories}
    images = {im["id"]: im for im in doc["images"]}
    for r in table.to_pylist():
        im = images[r["image_id"]]
        assert r["file_name"] == "/".join(im["coco_url"].split("/")[-2:])
        assert r["neg_category_ids"] == sorted(label_of[i] for i in im["neg_category_ids"])
        assert r["not_exhaustive_category_ids"] == sorted(label_of[i] for i in im["not_exhaustive_category_ids"])
        assert all(c == 0 for c in r["iscrowd"])
    assert sum(bool(r["neg_category_ids"]) for r in table.to_pylist()) > 10


def test_errors_are_one_line(tmp_path, capsys):
    main = _job_main("build_shards")

    ds = generate_dataset(str(tmp_path / "src"), SyntheticConfig(images=3, val_images=2, classes=3))
    tr = ds.splits["train"]
    with pytest.raises(FileNotFoundError, match="annotations file not found"):
        build_shards(str(tmp_path / "nope.json"), tr.images, str(tmp_path / "o"), parallel=False)
    with pytest.raises(FileNotFoundError, match="none of the first 3 images was found"):
        build_shards(tr.annotations, str(tmp_path), str(tmp_path / "o"), parallel=False)
    (tmp_path / "bad.json").write_text('{"images": []}')
    with pytest.raises(ValueError, match=r"not COCO-format: missing list\(s\) \['annotations', 'categories'\]"):
        build_shards(str(tmp_path / "bad.json"), tr.images, str(tmp_path / "o"), parallel=False)
    with pytest.raises(ValueError, match="rows_per_shard must be a positive integer"):
        build_shards(tr.annotations, tr.images, str(tmp_path / "o"), rows_per_shard=0)
    build_shards(tr.annotations, tr.images, str(tmp_path / "o"), parallel=False, verbose=False)
    other = generate_dataset(str(tmp_path / "src4"), SyntheticConfig(images=3, val_images=2, classes=4))
    with pytest.raises(ValueError, match="categories .* differ"):
        build_shards(other.splits["val"].annotations, other.splits["val"].images, str(tmp_path / "o"), "val",
                     parallel=False)
    assert main(["--annotations", str(tmp_path / "nope.json"), "--images", tr.images, "--out",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("build_shards: error: annotations file not found") and err.count("\n") == 1
    assert main(["--annotations", ds.splits["val"].annotations, "--images", ds.splits["val"].images, "--out",
                 str(tmp_path / "o"), "--serial"]) == 0
    assert read_manifest(str(tmp_path / "o")).split_sizes == {"train": 3, "val": 2}  # split from the file name
