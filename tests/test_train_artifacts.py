"""Training pictures and progress: the console line, the per-category AP table (perfect / missing predictions),
and the eval artefacts logged to MLflow (curves, prediction grid PNG, AP CSV) from real shards."""

from __future__ import annotations

import csv
import io
import os

import numpy as np
import pytest

from pipeline.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"


def test_progress_line_has_step_total_epoch_loss_lr_speed_wait_eta():
    from pipeline.train.artifacts import Progress, total_steps

    assert total_steps(10, 4, 0) == 40 and total_steps(10, 4, 7) == 7
    p = Progress(40)
    line = p.line(1, 0, {"train/loss": 3.25, "train/lr": 1e-4, "train/images_per_s": 12.5,
                         "train/data_wait_fraction": 0.25})
    assert line.startswith("[train] step 1/40 (2%) epoch 0 | loss 3.2500 | lr 1.00e-04 | 12.5 img/s")
    assert "data wait 25%" in line and "ETA 0:" in line


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from pipeline.data.shards import build_shards
    from pipeline.data.synthetic import SyntheticConfig, generate_dataset

    work = tmp_path_factory.mktemp("art")
    gen = generate_dataset(str(work / "src"), SyntheticConfig(style="coco", classes=3, images=2, val_images=4,
                                                              image_size=(64, 96), seed=2))
    for split, paths in gen.splits.items():
        build_shards(paths.annotations, paths.images, str(work / "shards"), split=split, parallel=False)
    return work


def _gt_predictions(gt, drop_category=None):
    """Predictions equal to the ground truth (score 0.9), except those of `drop_category`."""
    cat_label = {c["id"]: i for i, c in enumerate(gt["categories"])}
    preds = []
    for im in gt["images"]:
        anns = [a for a in gt["annotations"] if a["image_id"] == im["id"] and a["category_id"] != drop_category
                and not a.get("iscrowd")]
        boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in anns], dtype=np.float32).reshape(-1, 4)
        preds.append((im["id"], {"boxes": boxes, "scores": np.full(len(anns), 0.9, np.float32),
                                 "labels": np.array([cat_label[a["category_id"]] for a in anns], np.int64)}))
    return preds


def test_per_category_ap_perfect_and_missing(shards):
    from pipeline.eval.evaluator import gt_from_shards
    from pipeline.train.artifacts import ap_table_csv, per_category_ap

    gt = gt_from_shards(str(shards / "shards"), "val")
    present = sorted({a["category_id"] for a in gt["annotations"] if not a.get("iscrowd")})
    rows = per_category_ap(_gt_predictions(gt), gt)
    assert [r["category_id"] for r in rows] == [c["id"] for c in gt["categories"]]
    for r in rows:
        if r["category_id"] in present:
            assert r["AP"] == pytest.approx(1.0) and r["gt_instances"] > 0
    dropped = present[0]
    rows = per_category_ap(_gt_predictions(gt, drop_category=dropped), gt)
    assert next(r for r in rows if r["category_id"] == dropped)["AP"] == 0.0
    table = list(csv.DictReader(io.StringIO(ap_table_csv(rows))))
    assert table[0].keys() == {"category_id", "name", "AP", "AP50", "gt_instances"} and table[0]["name"]


def test_eval_artifacts_logged_to_mlflow(shards):
    from mlflow.tracking import MlflowClient

    from pipeline.eval.evaluator import gt_from_shards
    from pipeline.tracking import mlflow_tracking as mt
    from pipeline.train.artifacts import log_eval_artifacts

    job = load_config(os.path.join(REPO, "configs/local/finetune_coco.yaml"), [f"data.shards={shards / 'shards'}"])
    gt = gt_from_shards(job.data.shards, "val")
    uri = f"sqlite:///{shards}/mlflow.db"
    run_id = mt.get_or_create_run(uri, "art", "art-run")
    history = [{"step": s, "train/loss": 5.0 / s, "train/loss_cls": 2.0 / s, "train/lr": 1e-4} for s in (1, 2, 3)]
    history.append({"step": 3, "val/AP": 0.5, "val/AP50": 0.7, "val/AP75": 0.4})
    logged = log_eval_artifacts(uri, run_id, history, 3, job, gt["categories"], _gt_predictions(gt), gt)
    assert logged == ["eval/loss_curves.png", "eval/ap_curves.png", "eval/predictions_step3.png",
                      "eval/per_category_ap_step3.csv"]
    client = MlflowClient(uri)
    assert {a.path for a in client.list_artifacts(run_id, "eval")} == set(logged)
    local = client.download_artifacts(run_id, "eval/predictions_step3.png", str(shards))
    with open(local, "rb") as f:
        assert f.read(8) == PNG
