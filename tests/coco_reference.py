"""The per-detection dict path of evaluation before the array path replaced it (pipeline/eval/coco_eval.py and
evaluator.score at d299769), kept verbatim as the reference that the array path must match
(tests/test_coco_eval.py) and as the BEFORE side of bench/eval_gather.py."""

from __future__ import annotations

import contextlib
import copy
import io
from typing import Any

import numpy as np


def reference_detections_to_coco(predictions, image_ids, label_to_cat) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for pred, image_id in zip(predictions, image_ids, strict=True):
        boxes = np.asarray(pred["boxes"], dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(pred["scores"], dtype=np.float64).reshape(-1)
        labels = np.asarray(pred["labels"], dtype=np.int64).reshape(-1)
        xywh = boxes.copy()
        xywh[:, 2:] -= xywh[:, :2]
        for b, s, lab in zip(xywh.tolist(), scores.tolist(), labels.tolist()):
            out.append({"image_id": int(image_id), "category_id": int(label_to_cat[lab]), "bbox": b,
                        "score": float(s)})
    return out


def reference_cap_per_image(detections, k):
    by_image: dict[int, list[dict[str, Any]]] = {}
    for d in detections:
        by_image.setdefault(d["image_id"], []).append(d)
    out = []
    for dets in by_image.values():
        out.extend(sorted(dets, key=lambda d: -d["score"])[:k])
    return out


def reference_evaluate_boxes(gt, detections, protocol="coco", max_dets=None) -> dict[str, float]:
    from faster_coco_eval import COCO, COCOeval_faster

    lvis = protocol == "lvis"
    max_dets = max_dets or (300 if lvis else 100)
    gt = copy.deepcopy(gt)
    for ann in gt["annotations"]:
        ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
        ann.setdefault("iscrowd", 0)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(gt)
        coco_dt = coco_gt.loadRes(reference_cap_per_image(detections, max_dets))
        ev = COCOeval_faster(coco_gt, coco_dt, iouType="bbox", lvis_style=lvis, print_function=lambda *a: None)
        ev.params.maxDets = [1, 10, max_dets]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    raw = {k: float(v) for k, v in ev.stats_as_dict.items()}
    out = {"AP": raw["AP_all"], "AP50": raw["AP_50"], "AP75": raw["AP_75"], "APs": raw["AP_small"],
           "APm": raw["AP_medium"], "APl": raw["AP_large"], "ARs": raw["AR_small"], "ARm": raw["AR_medium"],
           "ARl": raw["AR_large"]}
    ar_keys = [k for k in raw if k in ("AR_all", "AR_second", "AR_third") or (k.startswith("AR_") and k[3:].isdigit())]
    out.update({f"AR{m}": raw[k] for m, k in zip(ev.params.maxDets, ar_keys)})
    if lvis:
        out.update({k: raw[k] for k in ("APr", "APc", "APf")})
    return out
