"""Our COCO AP (faster-coco-eval) equals pycocotools' on the same detections; LVIS rules apply; the array path
(workers cap and send `Detections`, rank 0 passes one (N, 7) array to faster-coco-eval) gives exactly the metrics
of the per-detection dict path it replaced (tests/coco_reference.py, verbatim from before the change), on
generated predictions and on the synthetic validation set."""

from __future__ import annotations

import contextlib
import io
import os

import numpy as np
import pytest
from coco_reference import reference_detections_to_coco, reference_evaluate_boxes

from pipeline.eval.coco_eval import coco_gt_from_rows, evaluate_boxes
from pipeline.eval.detections import Detections
from pipeline.eval.evaluator import restrict_gt, score


# ------------------------------------------------------------------------------------------------------------------
def make_case(seed=0, n_images=12, n_cats=4, extra_fp=3):
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
        preds.append(_jittered(rng, np.concatenate([xy, xy + wh], 1) if n else np.zeros((0, 4)), labels, n_cats,
                               extra_fp))
    return rows, categories, preds


def _jittered(rng, xyxy, labels, n_cats, extra_fp, noise=4.0):
    """Detections: the truths jittered + `extra_fp` random false positives; float32 as the model outputs them;
    scores rounded to 2 decimals so that ties (whose order decides the cap and COCO's matching) occur."""
    fp = rng.uniform(0, 200, (extra_fp, 2)).repeat(2, 1) + rng.uniform(10, 60, (extra_fp, 1)) * np.array([0, 0, 1, 1])
    boxes = np.concatenate([xyxy + rng.normal(0, noise, xyxy.shape), fp]).astype(np.float32)
    scores = np.round(rng.random(len(boxes)), 2).astype(np.float32)
    return {"boxes": boxes, "scores": scores,
            "labels": np.concatenate([labels, rng.integers(0, n_cats, extra_fp)]).astype(np.int64)}


def pycocotools_stats(gt, results):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dets = [{"image_id": int(r[0]), "bbox": [float(v) for v in r[1:5]], "score": float(r[5]),
             "category_id": int(r[6])} for r in results]
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


def _results(preds, rows, cats, max_dets=0):
    return Detections.from_predictions(zip([r["image_id"] for r in rows], preds), max_dets).coco_results(
        [c["id"] for c in cats])


@pytest.mark.parametrize("seed", [0, 1])
def test_ap_equals_pycocotools(seed):
    rows, cats, preds = make_case(seed)
    gt = coco_gt_from_rows(rows, cats)
    results = _results(preds, rows, cats)
    ours = evaluate_boxes(gt, results, "coco")
    ref = pycocotools_stats(gt, results)
    assert ours["AP"] > 0.05
    np.testing.assert_allclose([ours[k] for k in ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"]],
                               ref[:9], atol=1e-6)


def test_perfect_and_empty():
    rows, cats, _ = make_case(3)
    gt = coco_gt_from_rows(rows, cats)
    perfect = [{"boxes": np.array([[x, y, x + w, y + h] for x, y, w, h in r["boxes"]]).reshape(-1, 4),
                "scores": np.ones(len(r["labels"])), "labels": np.array(r["labels"], dtype=int)} for r in rows]
    assert evaluate_boxes(gt, _results(perfect, rows, cats))["AP"] == pytest.approx(1.0)
    assert evaluate_boxes(gt, np.zeros((0, 7)))["AP"] == 0.0
    with pytest.raises(ValueError, match=r"\(N, 7\) array .* got shape \(3, 6\)"):
        evaluate_boxes(gt, np.zeros((3, 6)))


def test_lvis_negative_categories_count_as_false_positives():
    rows, cats, preds = make_case(5)
    gt = coco_gt_from_rows(rows, cats)
    base = evaluate_boxes(gt, _results(preds, rows, cats), "lvis")
    assert {"APr", "APc", "APf"} <= set(base)
    # add confident detections of each image's negative category: LVIS scores them as false positives
    extra = []
    for r, p in zip(rows, preds):
        neg = r["neg_category_ids"]
        boxes = np.array([[0, 0, 50, 50]] * len(neg), dtype=float).reshape(-1, 4)
        extra.append({"boxes": np.concatenate([p["boxes"], boxes]),
                      "scores": np.concatenate([p["scores"], np.full(len(neg), 2.0)]),
                      "labels": np.concatenate([p["labels"], np.array(neg, dtype=int)])})
    worse = evaluate_boxes(gt, _results(extra, rows, cats), "lvis")
    assert worse["AP"] < base["AP"]
    with pytest.raises(ValueError, match="unknown evaluation protocol 'voc'"):
        evaluate_boxes(gt, np.zeros((0, 7)), "voc")


# ------------------------------------------------------------------------------------------------------------------
def _array_path(pairs, gt, protocol, max_dets, ranks=3):
    """The new path as the training loop runs it: each "rank" caps its images and builds arrays, the parts go
    through pickle (as gather_object sends them), rank 0 concatenates and scores."""
    import pickle

    parts = [Detections.from_predictions(pairs[r::ranks], max_dets) for r in range(ranks)]
    assert all(int(p.counts.max(initial=0)) <= max_dets for p in parts)
    received = [pickle.loads(pickle.dumps(p)) for p in parts]
    return score(Detections.concat(received), gt, protocol, max_dets)


def _dict_path(pairs, gt, protocol, max_dets):
    """The path before the change: all detections gathered, dicts built, capped on rank 0 (evaluator.score)."""
    ids = [i for i, _ in pairs]
    dets = reference_detections_to_coco([p for _, p in pairs], ids, [c["id"] for c in gt["categories"]])
    return reference_evaluate_boxes(restrict_gt(gt, ids), dets, protocol, max_dets)


@pytest.mark.parametrize("protocol", ["coco", "lvis"])
def test_array_path_equals_dict_path_on_generated_predictions(protocol):
    """More detections than max_dets per image, tied scores, images in shuffled order over 3 ranks: identical
    metrics (==, not approx). max_dets = 5 makes the cap bite on most images."""
    rows, cats, preds = make_case(7, n_images=40, extra_fp=8)
    gt = coco_gt_from_rows(rows, cats)
    order = np.random.default_rng(0).permutation(len(rows))
    pairs = [(rows[i]["image_id"], preds[i]) for i in order]
    assert max(len(p["scores"]) for _, p in pairs) > 5
    new, old = _array_path(pairs, gt, protocol, 5), _dict_path(pairs, gt, protocol, 5)
    assert new == old
    assert 0.05 < new["AP"] < 0.95
    new, old = _array_path(pairs, gt, protocol, 100), _dict_path(pairs, gt, protocol, 100)
    assert new == old


@pytest.mark.parametrize("style,protocol", [("coco", "coco"), ("lvis", "lvis")])
def test_array_path_equals_dict_path_on_synthetic_val_set(tmp_path, style, protocol):
    """The synthetic validation set (generated, sharded, read back by `gt_from_shards`), predictions = jittered
    truths + false positives: the same AP through both paths."""
    from pipeline.data.shards import build_shards
    from pipeline.data.synthetic import SyntheticConfig, generate_dataset
    from pipeline.eval.evaluator import gt_from_shards

    gen = generate_dataset(str(tmp_path / "src"), SyntheticConfig(style=style, classes=6, images=2, val_images=30,
                                                                   image_size=(48, 64), seed=3))
    shards = str(tmp_path / "shards")
    build_shards(gen.splits["val"].annotations, gen.splits["val"].images, shards, split="val", parallel=False,
                 verbose=False)
    gt = gt_from_shards(shards, "val")
    cat_index = {c["id"]: i for i, c in enumerate(gt["categories"])}
    rng = np.random.default_rng(11)
    pairs = []
    for im in gt["images"]:
        anns = [a for a in gt["annotations"] if a["image_id"] == im["id"]]
        xyxy = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]).reshape(-1, 4)
        labels = np.array([cat_index[a["category_id"]] for a in anns], dtype=np.int64)
        pairs.append((im["id"], _jittered(rng, xyxy, labels, len(cat_index), 6, noise=0.7)))
    assert len(pairs) == 30 and os.path.exists(os.path.join(shards, "manifest.json"))
    max_dets = 4
    new, old = _array_path(pairs, gt, protocol, max_dets), _dict_path(pairs, gt, protocol, max_dets)
    assert new == old
    assert new["AP"] > 0.1
    if protocol == "lvis":
        assert {"APr", "APc", "APf"} <= set(new)


def test_detections_cap_and_concat():
    pairs = [(7, {"boxes": np.arange(16, dtype=np.float32).reshape(4, 4), "scores": np.array([0.2, 0.9, 0.2, 0.5]),
                  "labels": np.array([0, 1, 2, 3])}),
             (3, {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, int)})]
    d = Detections.from_predictions(pairs, max_dets=3)
    assert d.images.tolist() == [7, 3] and d.counts.tolist() == [3, 0]
    assert d.labels.tolist() == [1, 3, 0]  # 0.9, 0.5, then the first of the tied 0.2s
    assert d.capped(2).labels.tolist() == [1, 3] and d.capped(2).counts.tolist() == [2, 0]
    assert d.nbytes == 2 * 8 + 2 * 4 + 3 * 16 + 3 * 4 + 3 * 4
    res = d.coco_results([10, 11, 12, 13])
    np.testing.assert_array_equal(res[0], [7, 4, 5, 2, 2, float(np.float32(0.9)), 11])  # box [4, 5, 6, 7] as xywh
    with pytest.raises(ValueError, match=r"images predicted more than once: \[3, 7\]"):
        Detections.concat([d, d])
    with pytest.raises(ValueError, match="labels span 0..3, expected 0..1"):
        d.coco_results([10, 11])


@pytest.mark.parametrize("protocol", ["coco", "lvis"])
def test_scoring_in_category_chunks_equals_one_pass(protocol):
    """Chunks of whole categories (down to one category per chunk) give the same metrics (==) as one pass."""
    from pipeline.eval.coco_eval import category_chunks

    rows, cats, preds = make_case(5, n_images=30, extra_fp=6)
    gt = coco_gt_from_rows(rows, cats)
    results = Detections.from_predictions([(r["image_id"], p) for r, p in zip(rows, preds)], 20).coco_results(
        [c["id"] for c in cats])
    cat_ids = sorted(c["id"] for c in cats)
    one = evaluate_boxes(gt, results, protocol, 20, chunk_detections=len(results))
    assert len(category_chunks(results[:, 6], cat_ids, len(results))) == 1
    for limit in (1, len(results) // 3):
        chunks = category_chunks(results[:, 6], cat_ids, limit)
        assert [c for ch in chunks for c in ch] == cat_ids and len(chunks) > 1
        assert evaluate_boxes(gt, results, protocol, 20, chunk_detections=limit) == one
    assert 0.05 < one["AP"] < 0.95
    # a category with truths but no detection: its chunk is empty
    rest = results[results[:, 6] != cat_ids[1]]
    assert evaluate_boxes(gt, rest, protocol, 20, chunk_detections=1) == evaluate_boxes(
        gt, rest, protocol, 20, chunk_detections=len(rest))
