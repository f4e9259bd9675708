"""The whole shard path against moto's S3 server over HTTP: generate to s3://, build shards to s3:// with Ray
Data, stream them back with `ray.data.read_parquet` through the storage layer's filesystem."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import ray

from pipeline import storage
from pipeline.data.shards import build_shards, read_manifest, shard_schema


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


def test_generate_build_stream_s3(s3_bucket, ray_local, capsys):
    make_synthetic = _job_main("make_synthetic")

    src = f"{s3_bucket}/raw/synth"
    assert make_synthetic(["--out", src, "--images", "10", "--val-images", "2", "--classes", "3", "--seed", "1",
                           "--image-size", "96", "160"]) == 0
    assert f"train: --annotations {src}/annotations/instances_train.json --images {src}/images/train" in (
        capsys.readouterr().out)
    out = f"{s3_bucket}/shards/synth"
    manifest = build_shards(f"{src}/annotations/instances_train.json", f"{src}/images/train", out, "train",
                            rows_per_shard=4, verbose=False)
    assert manifest.splits["train"].num_shards == 3 and manifest.split_sizes == {"train": 10}
    assert set(manifest.splits["train"].counts.values()) == {0}
    assert read_manifest(out) == manifest
    assert [u.rsplit("/", 1)[-1] for u in storage.listdir(f"{out}/train")] == [
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]

    fs, path = storage.get_fs(out)
    ds = ray.data.read_parquet(f"{path}/train", filesystem=fs)
    rows = sorted(ds.take_all(), key=lambda r: r["image_id"])
    assert ds.schema().base_schema == shard_schema(lvis=False)
    doc = storage.read_json(f"{src}/annotations/instances_train.json")
    label_of = {c["id"]: c["label"] for c in manifest.categories}
    assert [r["image_id"] for r in rows] == sorted(im["id"] for im in doc["images"])
    for r, im in zip(rows, sorted(doc["images"], key=lambda im: im["id"])):
        anns = [a for a in doc["annotations"] if a["image_id"] == im["id"]]
        assert (r["width"], r["height"]) == (im["width"], im["height"])
        assert r["image"] == storage.read_bytes(f"{src}/images/train/{im['file_name']}")
        assert [list(b) for b in r["boxes"]] == [a["bbox"] for a in anns]  # integer-valued: exact in float32
        assert list(r["labels"]) == [label_of[a["category_id"]] for a in anns]
        assert list(r["iscrowd"]) == [a["iscrowd"] for a in anns]


def test_unwritable_s3_outputs_fail_in_one_line(s3_endpoint, tmp_path, capsys):
    make_synthetic = _job_main("make_synthetic")
    assert make_synthetic(["--out", "s3://no-such-bucket-x1/synth", "--images", "2", "--val-images", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # earlier lines: moto's request log
    assert err.startswith("make_synthetic: error: cannot write to 's3://no-such-bucket-x1/synth'")
    make_synthetic(["--out", str(tmp_path), "--images", "2", "--val-images", "0", "--splits", "train"])
    with pytest.raises(OSError, match="cannot write to --out 's3://no-such-bucket-x1/shards'"):
        build_shards(f"{tmp_path}/annotations/instances_train.json", f"{tmp_path}/images/train",
                     "s3://no-such-bucket-x1/shards", parallel=False)
