"""COCO / LVIS box AP on detections, computed with faster-coco-eval (same numbers as pycocotools).

    gt = coco_gt_from_rows(rows, categories)                             # COCO-format dict
    results = Detections.from_predictions(pairs, 100).coco_results(cat_ids)  # (N, 7) [image, xywh, score, cat]
    metrics = evaluate_boxes(gt, results, protocol="coco")                # {"AP": ..., "AP50": ..., ...}

Detections reach faster-coco-eval as (N, 7) float64 arrays (`COCO.loadRes(ndarray)`), already capped to
`max_dets` per image by the workers (`pipeline.eval.detections`). The library turns each detection into a dict
and holds ~6 KB per detection while scoring, so the detections are scored in chunks of whole categories of at
most `chunk_detections` (one category may exceed it alone). Per category, COCO's and LVIS's matching, precision
and recall involve only that category's detections (the per-image cap is already applied), so the accumulated
precision / recall arrays of the chunks, concatenated along the category axis in sorted category order, are
the arrays of one unchunked evaluation, and the library's own `summarize` turns them into the same metrics
(tested with ==). Peak memory: the ground truth plus one chunk, ~1.5 GB, instead of ~47 GB for 80,000 images
x 100 detections in one pass (extrapolated from `bench/eval_score_memory.py`).

LVIS rules (`protocol="lvis"`): detections of a category listed in an image's `neg_category_ids` count as false
positives, detections of categories in `not_exhaustive_category_ids` are ignored when unmatched, categories that are
neither annotated nor negative in an image are not evaluated there, up to 300 detections per image are scored,
and AP_r / AP_c / AP_f group categories by their `frequency`.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Sequence
from typing import Any

import numpy as np

COCO_KEYS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "ARs", "ARm", "ARl"]
LVIS_EXTRA = ["APr", "APc", "APf"]


def default_max_dets(protocol: str, max_dets: int | None = None) -> int:
    """Detections scored per image: `max_dets` if set, else 300 under LVIS rules and 100 under COCO's."""
    return max_dets or (300 if protocol == "lvis" else 100)


# Detections per scoring chunk: faster-coco-eval holds ~6 KB per detection while scoring (2.3 GB for 400,000 in
# one pass, `bench/eval_score_memory.py`), so ~1.5 GB per chunk on top of the ground truth.
CHUNK_DETECTIONS = 250_000


def category_chunks(categories: np.ndarray, cat_ids: Sequence[int], limit: int) -> list[list[int]]:
    """`cat_ids` (sorted) cut into consecutive runs holding at most `limit` of the detections whose category ids
    are `categories` (N,), a run of one category where that category alone has more."""
    counts = dict(zip(*np.unique(np.asarray(categories, dtype=np.int64), return_counts=True)))
    chunks: list[list[int]] = [[]]
    held = 0
    for c in cat_ids:
        n = int(counts.get(c, 0))
        if chunks[-1] and held + n > limit:
            chunks.append([])
            held = 0
        chunks[-1].append(int(c))
        held += n
    return chunks


def evaluate_boxes(
    gt: dict[str, Any], results: np.ndarray, protocol: str = "coco", max_dets: int | None = None,
    chunk_detections: int = CHUNK_DETECTIONS,
) -> dict[str, float]:
    """Box AP of `results` against the COCO-format ground truth `gt`. Values in [0, 1]; -1 where undefined.

    results: (N, 7) rows [image_id, x, y, w, h, score, category_id] (source pixels, source category ids), at
    most `max_dets` per image (`Detections.capped`), every image_id in `gt`. Scored in chunks of whole
    categories of at most `chunk_detections` detections (module docstring)."""
    from faster_coco_eval import COCO, COCOeval_faster

    if protocol not in ("coco", "lvis"):
        raise ValueError(f"unknown evaluation protocol {protocol!r}: expected 'coco' or 'lvis'")
    results = np.asarray(results)
    if results.ndim != 2 or results.shape[1] != 7:
        raise ValueError(f"detection results must be an (N, 7) array [image_id, x, y, w, h, score, category_id], "
                         f"got shape {results.shape}")
    lvis = protocol == "lvis"
    max_dets = default_max_dets(protocol, max_dets)
    gt = copy.deepcopy(gt)
    for ann in gt["annotations"]:
        ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
        ann.setdefault("iscrowd", 0)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(gt)
        if not len(results):
            keys = COCO_KEYS[:9] + ["AR1", "AR10", f"AR{max_dets}"] + (LVIS_EXTRA if lvis else [])
            return {k: 0.0 for k in keys}
        cat_ids = sorted({int(c["id"]) for c in gt["categories"]})
        parts: dict[str, list[np.ndarray]] = {"precision": [], "recall": [], "scores": []}
        # one sort by category; a chunk is then a contiguous range of it (its rows taken back in input order)
        cats = results[:, 6].astype(np.int64)
        by_cat = np.argsort(cats, kind="stable")
        sorted_cats = cats[by_cat]
        for chunk in category_chunks(sorted_cats, cat_ids, chunk_detections):
            lo, hi = np.searchsorted(sorted_cats, chunk[0], "left"), np.searchsorted(sorted_cats, chunk[-1], "right")
            sel = results[np.sort(by_cat[lo:hi])]
            coco_dt = coco_gt.loadRes(np.ascontiguousarray(sel, dtype=np.float64).reshape(-1, 7))
            ev = COCOeval_faster(coco_gt, coco_dt, iouType="bbox", lvis_style=lvis, print_function=lambda *a: None)
            ev.params.catIds = chunk
            ev.params.maxDets = [1, 10, max_dets]
            ev.evaluate()
            ev.accumulate()
            for key, arrays in parts.items():
                if key in ev.eval:
                    arrays.append(ev.eval[key])
            del coco_dt, sel
        # the last chunk's evaluator summarises every category: its arrays replaced by the concatenation along
        # the category axis (precision / scores: T x R x K x A x M; recall: T x K x A x M)
        ev.params.catIds = cat_ids
        ev.eval = {**ev.eval, **{k: np.concatenate(v, axis=1 if k == "recall" else 2) for k, v in parts.items() if v}}
        if lvis:  # category indices per frequency label, as the library builds them for its own catIds
            freq = {int(c["id"]): c.get("frequency") for c in gt["categories"]}
            ev.freq_groups = [[i for i, c in enumerate(cat_ids) if freq[c] == lbl] for lbl in ev.params.imgCountLbl]
        ev.summarize()
    raw = {k: float(v) for k, v in ev.stats_as_dict.items()}
    out = {"AP": raw["AP_all"], "AP50": raw["AP_50"], "AP75": raw["AP_75"], "APs": raw["AP_small"],
           "APm": raw["AP_medium"], "APl": raw["AP_large"], "ARs": raw["AR_small"], "ARm": raw["AR_medium"],
           "ARl": raw["AR_large"]}
    ar_keys = [k for k in raw if k in ("AR_all", "AR_second", "AR_third") or (k.startswith("AR_") and k[3:].isdigit())]
    ar = [raw[k] for k in ar_keys]
    out.update({f"AR{m}": v for m, v in zip(ev.params.maxDets, ar)})
    if lvis:
        out.update({k: raw[k] for k in LVIS_EXTRA})
    return out


def coco_gt_from_rows(rows: Sequence[dict[str, Any]], categories: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """COCO-format ground truth from shard rows (contract columns; labels are contiguous) and the manifest's
    categories (entry i = label i with the source `id`)."""
    images, annotations = [], []
    ann_id = 1
    for row in rows:
        img = {"id": int(row["image_id"]), "width": int(row["width"]), "height": int(row["height"]),
               "file_name": row.get("file_name", "")}
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):
            if key in row and row[key] is not None:
                img[key] = [int(categories[int(lab)]["id"]) for lab in row[key]]
        images.append(img)
        crowd = row.get("iscrowd")
        for j, (box, lab) in enumerate(zip(row["boxes"], row["labels"])):
            x, y, w, h = (float(v) for v in box)
            annotations.append({"id": ann_id, "image_id": img["id"], "category_id": int(categories[int(lab)]["id"]),
                                "bbox": [x, y, w, h], "area": w * h,
                                "iscrowd": int(crowd[j]) if crowd is not None else 0})
            ann_id += 1
    cats = [{k: v for k, v in c.items() if k in ("id", "name", "frequency")} for c in categories]
    return {"images": images, "annotations": annotations, "categories": cats}
