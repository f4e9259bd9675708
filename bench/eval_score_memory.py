"""Rank 0's scoring (`evaluate_boxes`: faster-coco-eval's loadRes, evaluate, accumulate, summarize) in one pass
vs in chunks of whole categories: peak memory, time, and the metrics (which must be equal), side by side (issue 16).

    .venv/bin/python bench/eval_score_memory.py                                   # 10,000 images x 100 detections
    .venv/bin/python bench/eval_score_memory.py --images 20000 --chunks 2000000 250000

An Objects365-like validation set is generated (365 categories, 5-25 boxes per image, detections = jittered
truths and false positives, `--dets` per image, already capped as the workers send them). Each chunk size runs
`evaluate_boxes(gt, results, "coco", dets, chunk_detections=c)` in a fresh child process; the first size given
should be at least images x dets (one pass, what the code did before chunking). Peak = the child's VmHWM minus
its RSS once the inputs are built (ground truth dict and the (N, 7) array).
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from child_result import emit, run  # noqa: E402
from eval_gather import status_kb  # noqa: E402  (/proc/self/status fields, kB)

NUM_CLASSES = 365


def make_case(images: int, dets: int, seed: int = 0) -> tuple[dict, np.ndarray]:
    """(COCO-format ground truth, (images * dets, 7) results [image_id, x, y, w, h, score, category_id])."""
    rng = np.random.default_rng(seed)
    cats = [{"id": c, "name": f"object_{c:03d}"} for c in range(1, NUM_CLASSES + 1)]
    imgs, anns, res = [], [], []
    ann_id = 0
    for i in range(1, images + 1):
        imgs.append({"id": i, "width": 640, "height": 480})
        n = int(rng.integers(5, 26))
        xy = rng.uniform(0, 400, (n, 2))
        wh = rng.uniform(10, 200, (n, 2))
        cat = rng.integers(1, NUM_CLASSES + 1, n)
        for b in range(n):
            ann_id += 1
            anns.append({"id": ann_id, "image_id": i, "category_id": int(cat[b]), "bbox": [*xy[b], *wh[b]],
                         "area": float(wh[b, 0] * wh[b, 1]), "iscrowd": 0})
        k = np.arange(dets) % n  # every truth jittered several times, plus false positives
        box = np.concatenate([xy[k], wh[k]], 1) + rng.normal(0, 8, (dets, 4))
        box[:, 2:] = np.abs(box[:, 2:]) + 1
        c = np.where(rng.random(dets) < 0.5, cat[k], rng.integers(1, NUM_CLASSES + 1, dets))
        res.append(np.column_stack([np.full(dets, i), box, rng.random(dets), c]))
    return {"images": imgs, "annotations": anns, "categories": cats}, np.concatenate(res).astype(np.float64)


def child(case: str, chunk: int) -> None:
    from pipeline.eval.coco_eval import evaluate_boxes

    with open(case, "rb") as f:
        gt, results, dets = pickle.load(f)
    base = status_kb("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    metrics = evaluate_boxes(gt, results, "coco", dets, chunk_detections=chunk)
    emit({"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
          "peak_delta_mb": (status_kb("VmHWM") - base) / 1024, "metrics": metrics})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--dets", type=int, default=100, help="detections per image (after the workers' cap)")
    p.add_argument("--chunks", type=int, nargs="+", default=[10**9, 250_000, 25_000],
                   help="chunk_detections values; the first one pass")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.child[0], int(args.child[1]))

    gt, results = make_case(args.images, args.dets)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-eval-score-") as tmp:
        case = os.path.join(tmp, "case.pkl")
        with open(case, "wb") as f:
            pickle.dump((gt, results, args.dets), f, protocol=5)
        for chunk in args.chunks:
            rows.append((chunk, run([sys.executable, os.path.abspath(__file__), "--child", case, str(chunk)],
                                    what=f"chunk {chunk}")))
    print(f"\nimages={args.images}  detections={len(results)}  ground-truth boxes={len(gt['annotations'])}  "
          f"categories={NUM_CLASSES}  load={os.getloadavg()[0]:.2f}")
    print(f"{'chunk_detections':>16} {'peak MB':>8} {'wall s':>7} {'cpu s':>6}  AP      metrics equal to the first")
    first = rows[0][1]["metrics"]
    for chunk, r in rows:
        label = "one pass" if chunk >= len(results) else str(chunk)
        print(f"{label:>16} {r['peak_delta_mb']:>8.0f} {r['wall_s']:>7.1f} {r['cpu_s']:>6.1f}  "
              f"{r['metrics']['AP']:.4f}  {r['metrics'] == first}")


if __name__ == "__main__":
    main()
