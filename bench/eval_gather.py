"""Rank 0 of a distributed evaluation: peak memory and time of gathering the detections and preparing them for
faster-coco-eval, BEFORE (the per-detection dict path of d299769) and AFTER (workers cap to max_dets and send
`Detections` arrays; rank 0 builds one (N, 7) array for `COCO.loadRes`), side by side.

    .venv/bin/python bench/eval_gather.py                          # 80,000 images x 1,000 detections, 8 ranks
    .venv/bin/python bench/eval_gather.py --images 8000 --side-by-side-images 800   # quicker

Simulation of the 8 ranks in one machine: the parent process builds each rank's payload exactly as the worker
would (BEFORE: `predict`'s list of (image_id, {boxes, scores, labels} float32 arrays) with every one of the 1,000
detections; AFTER: `Detections.from_predictions(..., max_dets)`), pickles it as `gather_object` does and writes the
bytes to a temp dir. A fresh child process then plays rank 0: it reads the 8 pickles into memory (standing in for
gather_object's receive buffer), unpickles them and runs rank 0's code up to the loaded result set
(`coco_gt.loadRes(...)`): BEFORE = `[p for part in parts for p in part]` + `detections_to_coco` + `restrict_gt` +
`evaluate_boxes` up to `loadRes(_cap_per_image(...))`; AFTER = `Detections.concat` + `capped` + `coco_results` +
`restrict_gt` + `loadRes(ndarray)`. COCOeval's evaluate/accumulate are not run (the same work for both paths once
the capped result set is loaded). Peak memory = the child's VmHWM minus its RSS after imports; time = wall
(and CPU) seconds from reading the first pickle to the end. The ground truth holds the images and 365 categories
but no boxes (loadRes needs only the images).

Scales: BEFORE builds a Python dict per detection before capping (80 million at full scale: tens of GB), so the
side-by-side comparison runs at `--side-by-side-images` (default 2,000 images x 1,000 detections); the full
`--images` scale then runs AFTER's gather + array building (no loadRes: faster-coco-eval holds ~1 KB per loaded
detection, ~8 GB for 8 million), and BEFORE / AFTER-with-loadRes at full scale are extrapolated linearly from the
side-by-side run (printed as such).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # coco_reference: the BEFORE path

from coco_reference import reference_cap_per_image, reference_detections_to_coco  # noqa: E402

NUM_CATEGORIES = 365  # Objects365


# ------------------------------------------------------------------------------------------------------------------
# BEFORE: the rank-0 path of d299769 (pipeline/eval/coco_eval.py + evaluator.score), verbatim up to loadRes; its
# functions are the reference copies in tests/coco_reference.py (the ones tests/test_coco_eval.py checks against).
def legacy_rank0(parts, gt, max_dets):
    from faster_coco_eval import COCO

    from pipeline.eval.evaluator import restrict_gt

    predictions = [p for part in parts for p in part]
    cat_ids = [c["id"] for c in gt["categories"]]
    ids = [i for i, _ in predictions]
    dets = reference_detections_to_coco([p for _, p in predictions], ids, cat_ids)
    gt = copy.deepcopy(restrict_gt(gt, ids))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(gt)
        return coco_gt.loadRes(reference_cap_per_image(dets, max_dets))


# ------------------------------------------------------------------------------------------------------------------
def make_gt(n_images: int) -> dict[str, Any]:
    return {"images": [{"id": i + 1, "width": 1024, "height": 768} for i in range(n_images)], "annotations": [],
            "categories": [{"id": c + 1, "name": f"c{c}"} for c in range(NUM_CATEGORIES)]}


def rank_predictions(rank: int, ranks: int, n_images: int, dets: int):
    """The (image_id, {boxes, scores, labels}) pairs `predict` yields on `rank` (images rank, rank + ranks, ...),
    float32 as predict returned them before the change (labels too: it called .float() on every output)."""
    ids = np.arange(rank, n_images, ranks) + 1
    rng = np.random.default_rng(rank)
    m = len(ids) * dets
    xy = rng.uniform(0, 900, (m, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + rng.uniform(2, 120, (m, 2)).astype(np.float32)], 1)
    scores = rng.random(m, dtype=np.float32)
    labels = rng.integers(0, NUM_CATEGORIES, m).astype(np.float32)
    for j, image_id in enumerate(ids.tolist()):
        s = slice(j * dets, (j + 1) * dets)
        yield image_id, {"boxes": boxes[s], "scores": scores[s], "labels": labels[s]}


def write_payloads(mode: str, out_dir: str, ranks: int, n_images: int, dets: int, max_dets: int) -> dict:
    """Each rank's gather_object payload, pickled, one file per rank. Returns sizes and worker-side seconds."""
    from pipeline.eval.detections import Detections

    sizes, worker_s = [], []
    for r in range(ranks):
        pairs = rank_predictions(r, ranks, n_images, dets)
        t = time.perf_counter()
        payload = list(pairs) if mode == "before" else Detections.from_predictions(pairs, max_dets)
        data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)  # what gather_object serialises
        worker_s.append(time.perf_counter() - t)
        with open(os.path.join(out_dir, f"rank{r}.pkl"), "wb") as f:
            f.write(data)
        sizes.append(len(data))
        del payload, data
    return {"payload_bytes_per_rank": max(sizes), "payload_bytes_total": sum(sizes),
            "worker_seconds_max": round(max(worker_s), 2)}


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rank0(mode: str, payload_dir: str, ranks: int, n_images: int, max_dets: int, load: bool) -> dict:
    """Child process: rank 0's side. Returns peak/baseline memory and stage times."""
    import faster_coco_eval  # noqa: F401  (imported before the baseline, as in a running worker)

    from pipeline.eval.detections import Detections
    from pipeline.eval.evaluator import restrict_gt

    gt = make_gt(n_images)
    base_kb = status_kb("VmRSS")
    cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    buffers = []
    for r in range(ranks):  # gather_object's receive buffer: every rank's bytes at once
        with open(os.path.join(payload_dir, f"rank{r}.pkl"), "rb") as f:
            buffers.append(f.read())
    parts = [pickle.loads(b) for b in buffers]
    del buffers
    t_gather = time.perf_counter() - t0
    stages: dict[str, float] = {"gather_unpickle_s": round(t_gather, 2)}
    if mode == "before":
        res = legacy_rank0(parts, gt, max_dets)
        n_loaded = len(res.dataset["annotations"])
    else:
        from faster_coco_eval import COCO

        dets = Detections.concat(parts).capped(max_dets)
        del parts
        results = dets.coco_results([c["id"] for c in gt["categories"]])
        sub = restrict_gt(gt, dets.images.tolist())
        stages["arrays_s"] = round(time.perf_counter() - t0 - t_gather, 2)
        stages["results_array_bytes"] = results.nbytes
        n_loaded = len(results)
        if load:
            t1 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                coco_gt = COCO(copy.deepcopy(sub))
                res = coco_gt.loadRes(results)
            stages["loadres_s"] = round(time.perf_counter() - t1, 2)
            n_loaded = len(res.dataset["annotations"])
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    peak_kb = status_kb("VmHWM")
    return {"mode": mode, "loaded_detections": n_loaded, "wall_s": round(wall, 2),
            "cpu_s": round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 2),
            "baseline_rss_mb": round(base_kb / 1024), "peak_rss_mb": round(peak_kb / 1024),
            "peak_delta_mb": round((peak_kb - base_kb) / 1024), **stages}


def run_case(mode: str, ranks: int, n_images: int, dets: int, max_dets: int, load: bool, tmp: str) -> dict:
    d = tempfile.mkdtemp(prefix=f"{mode}-", dir=tmp)
    sent = write_payloads(mode, d, ranks, n_images, dets, max_dets)
    cmd = [sys.executable, os.path.abspath(__file__), "--rank0", mode, "--payload-dir", d, "--ranks", str(ranks),
           "--images", str(n_images), "--max-dets", str(max_dets)] + (["--load"] if load else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for r in range(ranks):
        os.remove(os.path.join(d, f"rank{r}.pkl"))
    os.rmdir(d)
    if out.returncode != 0:
        raise RuntimeError(f"rank-0 child ({mode}) failed:\n{out.stderr[-3000:]}")
    return {"images": n_images, "dets_per_image": dets, "ranks": ranks, **sent,
            **json.loads(out.stdout.strip().splitlines()[-1])}


def _loadavg() -> str:
    with open("/proc/loadavg") as f:
        return f.read().strip()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=80_000)
    p.add_argument("--dets", type=int, default=1000, help="detections per image on the workers (ViT-L: 1000)")
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--max-dets", type=int, default=100)
    p.add_argument("--side-by-side-images", type=int, default=2000)
    p.add_argument("--rank0", choices=["before", "after"], help=argparse.SUPPRESS)
    p.add_argument("--payload-dir", help=argparse.SUPPRESS)
    p.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.rank0:
        print(json.dumps(rank0(a.rank0, a.payload_dir, a.ranks, a.images, a.max_dets, a.load)))
        return

    tmp = tempfile.mkdtemp(prefix="eval_gather_")
    print(f"loadavg at start: {_loadavg()}  ({os.cpu_count()} CPUs)")
    s = a.side_by_side_images
    print(f"\n== side by side: {s:,} images x {a.dets:,} detections over {a.ranks} ranks, max_dets {a.max_dets}, "
          f"rank 0 up to loadRes ==")
    before = run_case("before", a.ranks, s, a.dets, a.max_dets, True, tmp)
    after = run_case("after", a.ranks, s, a.dets, a.max_dets, True, tmp)
    assert before["loaded_detections"] == after["loaded_detections"] == s * min(a.dets, a.max_dets)
    for r in (before, after):
        print(json.dumps(r))
    ratio = {k: before[k] / max(after[k], 1e-3) for k in ("peak_delta_mb", "wall_s", "cpu_s", "payload_bytes_total")}
    print(f"ratio BEFORE/AFTER: rank-0 peak delta {ratio['peak_delta_mb']:.1f}x, wall {ratio['wall_s']:.1f}x, "
          f"cpu {ratio['cpu_s']:.1f}x, bytes sent {ratio['payload_bytes_total']:.1f}x")
    print(f"loadavg: {_loadavg()}")

    n = a.images
    print(f"\n== full scale: {n:,} images x {a.dets:,} detections over {a.ranks} ranks, AFTER up to the (N, 7) "
          f"array (no loadRes) ==")
    full = run_case("after", a.ranks, n, a.dets, a.max_dets, False, tmp)
    print(json.dumps(full))
    k = n / s
    ext_before_mb = before["peak_delta_mb"] * k
    ext_load_s = after.get("loadres_s", 0) * k
    print(f"extrapolated x{k:g} from the side-by-side run (linear in detections; NOT measured):")
    print(f"  BEFORE rank-0 peak delta ~{ext_before_mb / 1024:.1f} GB, wall ~{before['wall_s'] * k / 60:.0f} min")
    print(f"  AFTER + loadRes: peak delta ~{after['peak_delta_mb'] * k / 1024:.1f} GB, "
          f"wall ~{(full['wall_s'] + ext_load_s) / 60:.1f} min (loadRes ~{ext_load_s / 60:.1f} min)")
    ratio_full = ext_before_mb / max(full["peak_delta_mb"], 1)
    print(f"  measured AFTER to the array: {full['peak_delta_mb']} MB, {full['wall_s']} s; BEFORE/AFTER peak at full "
          f"scale (extrapolated BEFORE / measured AFTER-to-array): {ratio_full:.0f}x")
    print(f"loadavg at end: {_loadavg()}")
    os.rmdir(tmp)


if __name__ == "__main__":
    main()
