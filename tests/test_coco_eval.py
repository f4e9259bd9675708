"""Our COCO AP (faster-coco-eval) equals pycocotools' on the same detections; LVIS rules apply."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

from pipeline.eval.coco_eval import coco_gt_from_rows, detections_to_coco, evaluate_boxes


def make_case(seed=0, n_images=12, n_cats=4):
    rng = np.random.default_rng(seed)
    categories = [{"id": 10 + 3 * i, "name": f"c{i}", "frequency": "rcf"[i % 3]} for i in range(n_cats)]
    rows, preds = [], []
    for i in range(n_images):
        n = int(rng.integers(0, 6))
        xy = rng.uniform(0, 200, (n, 2))
        wh = rng.uniform(4, 120, (n, 2))
        labels = rng.integers(0, n_cats, n)
        rows.append({"image_id": 100 + i, "width": 320, "height": 320, "boxes": np.concatenate([xy, wh], 1).tolist(),
                     "labels": labels.tolist(), "iscrowd": (rng.random(n) < 0.1).astype(int).tolist(),
                     "neg_category_ids": [int(c) for c in range(n_cats) if c not in labels][:1],
                     "not_exhaustive_category_ids": []})
        # detections: jittered truths with random scores + false positives
        m = n + 3
        boxes = np.concatenate([xy, xy + wh], 1) if n else np.zeros((0, 4))
        boxes = np.concatenate([boxes + rng.normal(0, 4, boxes.shape), rng.uniform(0, 200, (3, 2)).repeat(2, 1)
                                + np.array([0, 0, 30, 30])])
        fp_labels = rng.integers(0, n_cats, 3)
        preds.append({"boxes": boxes, "scores": rng.random(m), "labels": np.concatenate([labels, fp_labels])})
    return rows, categories, preds


def pycocotools_stats(gt, dets):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


@pytest.mark.parametrize("seed", [0, 1])
def test_ap_equals_pycocotools(seed):
    rows, cats, preds = make_case(seed)
    gt = coco_gt_from_rows(rows, cats)
    dets = detections_to_coco(preds, [r["image_id"] for r in rows], [c["id"] for c in cats])
    ours = evaluate_boxes(gt, dets, "coco")
    ref = pycocotools_stats(gt, dets)
    assert ours["AP"] > 0.05
    np.testing.assert_allclose([ours[k] for k in ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"]],
                               ref[:9], atol=1e-6)


def test_perfect_and_empty():
    rows, cats, _ = make_case(3)
    gt = coco_gt_from_rows(rows, cats)
    perfect = [{"boxes": np.array([[x, y, x + w, y + h] for x, y, w, h in r["boxes"]]).reshape(-1, 4),
                "scores": np.ones(len(r["labels"])), "labels": np.array(r["labels"], dtype=int)} for r in rows]
    dets = detections_to_coco(perfect, [r["image_id"] for r in rows], [c["id"] for c in cats])
    assert evaluate_boxes(gt, dets)["AP"] == pytest.approx(1.0)
    assert evaluate_boxes(gt, [])["AP"] == 0.0


def test_lvis_negative_categories_count_as_false_positives():
    rows, cats, preds = make_case(5)
    gt = coco_gt_from_rows(rows, cats)
    ids = [r["image_id"] for r in rows]
    cat_ids = [c["id"] for c in cats]
    base = evaluate_boxes(gt, detections_to_coco(preds, ids, cat_ids), "lvis")
    assert {"APr", "APc", "APf"} <= set(base)
    # add confident detections of each image's negative category: LVIS scores them as false positives
    extra = []
    for r, p in zip(rows, preds):
        neg = r["neg_category_ids"]
        boxes = np.array([[0, 0, 50, 50]] * len(neg), dtype=float).reshape(-1, 4)
        extra.append({"boxes": np.concatenate([p["boxes"], boxes]),
                      "scores": np.concatenate([p["scores"], np.full(len(neg), 2.0)]),
                      "labels": np.concatenate([p["labels"], np.array(neg, dtype=int)])})
    worse = evaluate_boxes(gt, detections_to_coco(extra, ids, cat_ids), "lvis")
    assert worse["AP"] <= base["AP"]
    with pytest.raises(ValueError, match="unknown evaluation protocol 'voc'"):
        evaluate_boxes(gt, [], "voc")
