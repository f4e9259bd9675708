"""Batch inference with Ray Data on a registered model: detections equal the in-memory model's (the evaluation
path), from a shard split and from an image list with a corrupt and a missing file (skipped, counted, listed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import dump_yaml, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Synthetic COCO-style val images + shards, and a tiny K=2 Co-DINO registered on SQLite MLflow through the
    project's registration code (as a finished stage does)."""
    from pipeline import storage
    from pipeline.data.shards import build_shards
    from pipeline.data.synthetic import SyntheticConfig, generate_dataset
    from pipeline.models import build_model
    from pipeline.tracking import mlflow_tracking as mt

    work = tmp_path_factory.mktemp("predict")
    gen = generate_dataset(str(work / "src"), SyntheticConfig(style="coco", classes=3, images=2, val_images=5,
                                                              image_size=(64, 96), seed=5))
    shards = str(work / "shards")
    for split, paths in gen.splits.items():
        build_shards(paths.annotations, paths.images, shards, split=split, parallel=False)
    manifest = storage.read_json(f"{shards}/manifest.json")
    categories = [{"id": c["id"], "name": c["name"]} for c in manifest["categories"]]
    job = load_config(os.path.join(REPO, "configs/local/finetune_coco.yaml"),
                      ["model.num_classes=3", "data.eval_size=[80,120]", f"data.shards={shards}",
                       f"work_dir={work}"])
    torch.manual_seed(1)
    model = build_model(job.model).eval()
    model.categories = categories
    tracking = f"sqlite:///{work}/mlflow.db"
    run_id = mt.get_or_create_run(tracking, "predict-test", "predict-run")
    mt.log_text(tracking, run_id, dump_yaml(job), "config.yaml")
    version, _ = mt.log_and_register_model(tracking, run_id, model, "codetr-predict", 0.1)
    return {"work": work, "shards": shards, "job": job, "model": model, "categories": categories,
            "tracking": tracking, "uri": f"models:/codetr-predict/{version}",
            "val_images": gen.splits["val"].images}


def _close(got: dict, want: dict) -> None:
    assert len(got["scores"]) == len(want["scores"]) > 0
    np.testing.assert_allclose(np.asarray(got["boxes"], dtype=np.float64).reshape(-1, 4), want["boxes"], atol=1e-3)
    np.testing.assert_allclose(np.asarray(got["scores"]), want["scores"], atol=1e-5)
    assert list(got["labels"]) == want["labels"].tolist()


def test_predict_shard_split_equals_in_memory_evaluation(setup, ray_local):
    from pipeline.data.collate import collate_samples
    from pipeline.data.loader import ShardDataset
    from pipeline.eval.evaluator import predict
    from pipeline.inference import load_for_inference
    from pipeline.inference.ray_predict import predict_dataset
    from pipeline.inference.sources import resolve_source

    loaded = load_for_inference(setup["uri"], setup["tracking"])
    assert len(loaded.model.aux_heads) == 0 and loaded.preprocess.eval_size == (80, 120)
    rows, skipped, stats = predict_dataset(loaded, resolve_source(setup["shards"], "val"), batch_size=1,
                                           num_actors=1, decode_tasks=1, use_gpu=False)
    assert not skipped and stats["images"] == 5 and stats["images_per_s"] > 0
    print(f"\n[measured] shard split: {stats}")
    # the in-memory K=2 model through the evaluation path (ShardDataset -> collate -> model), batch 1
    ds = ShardDataset(setup["job"].data, "val", train=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=1, collate_fn=collate_samples)
    want = dict(predict(setup["model"], loader))
    by_id = {r["image_id"]: r for r in rows}
    assert set(by_id) == set(want)
    for image_id, w in want.items():
        _close(by_id[image_id], w)
        names = {c["id"]: c["name"] for c in setup["categories"]}
        assert by_id[image_id]["category_names"] == [names[c] for c in by_id[image_id]["category_ids"]]


def test_predict_image_list_skips_bad_input_and_writes_outputs(setup, ray_local, tmp_path):
    from pipeline.inference import Detector, LoadedModel, PreprocessConfig, load_for_inference
    from pipeline.inference.preprocess import decode_image_bytes
    from pipeline.inference.ray_predict import predict_dataset
    from pipeline.inference.sources import list_images, resolve_source
    from pipeline.inference.writers import write_outputs

    images = list_images(setup["val_images"])
    assert len(images) == 5
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([images[0], "broken.jpg", images[1], str(tmp_path / "missing.png"), images[2]]))
    loaded = load_for_inference(setup["uri"], setup["tracking"])
    rows, skipped, stats = predict_dataset(loaded, resolve_source(str(listing)), batch_size=2, num_actors=1,
                                           decode_tasks=1, use_gpu=False)
    assert stats["images"] == 3 and stats["skipped"] == 2
    assert sorted(s["image_id"] for s in skipped) == [2, 4]
    assert "cannot decode" in next(s for s in skipped if s["image_id"] == 2)["error"]
    assert "FileNotFoundError" in next(s for s in skipped if s["image_id"] == 4)["error"]
    # in memory, one image at a time (the job ran batches of 2: padding may move scores in the last digits)
    det = Detector(LoadedModel(setup["model"], setup["categories"], PreprocessConfig.from_data(setup["job"].data)))
    for r in rows:
        with open(r["path"], "rb") as f:
            w = det.predict([decode_image_bytes(f.read())])[0]
        assert len(r["scores"]) == len(w["scores"])
        assert r["width"] > 0 and np.asarray(r["boxes"])[:, 2].max() <= r["width"] + 1e-3
    uris = write_outputs(str(tmp_path / "out"), rows, skipped, {"model": setup["uri"], **stats})
    coco = json.loads(Path(uris["detections.json"]).read_text())
    assert {d["image_id"] for d in coco} == {1, 3, 5} and all(len(d["bbox"]) == 4 for d in coco)
    assert {d["category_id"] for d in coco} <= {c["id"] for c in setup["categories"]}
    table = pq.read_table(uris["predictions.parquet"])
    assert table.column("image_id").to_pylist() == [1, 3, 5]
    assert len(json.loads(Path(uris["skipped.json"]).read_text())) == 2


def test_predict_job_bad_model_uri_is_one_line_error(setup):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "jobs/predict.py"), "--model",
                           str(setup["work"] / "no-such-checkpoint"), "--images", setup["shards"]],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "no-such-checkpoint" in proc.stderr
