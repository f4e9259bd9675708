"""Shard-build scale benchmark: an Objects365-like source at a fraction of the real size -> shards, with the
driver's wall time, images/s and peak RSS, per fraction (issue 17).

    .venv/bin/python bench/shard_build_scale.py --fractions 0.01 0.03 --work /tmp/o365scale
    .venv/bin/python bench/shard_build_scale.py --fractions 0.03 --code /tmp/old   # another checkout's builder
    .venv/bin/python bench/shard_build_scale.py --fractions 0.1 --serial           # no Ray (one process)

The source mimics Objects365 v2 train: 1,742,289 images at fraction 1.0, `file_name`
"images/v1/patchN/objects365_v1_XXXXXXXX.jpg" while the files are stored as `patchN/...` (the download layout),
365 categories (ids 1..365), 5..25 boxes per image (mean 15), Objects365's annotation fields (id, iscrowd,
isfake, area, isreflected, bbox, image_id, category_id) and top-level key order (images, annotations,
categories, licenses). The images are a handful of tiny JPEGs reused (the bench measures the builder's
driver, not image bytes). The JSON is written streaming, so generating 10% needs little memory.

Each build runs in a fresh subprocess (`--code` selects the checkout whose `pipeline` package it imports) that
prints its own peak RSS (`ru_maxrss`, the driver process only: Ray's workers, raylet and GCS are other
processes). The source is generated once per fraction and reused (`--work`).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/ helpers, also when loaded by file path (tests)
from child_result import run  # noqa: E402

O365_TRAIN_IMAGES = 1_742_289
NUM_CLASSES = 365
PATCH = 34_000  # images per patch folder (Objects365 v2 has ~51 train patches of ~34k images)
SIZES = ((64, 48), (48, 64), (56, 56), (72, 40))


def _jpegs() -> list[bytes]:
    out = []
    for k, (w, h) in enumerate(SIZES):
        rng = np.random.default_rng(k)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=70)
        out.append(buf.getvalue())
    return out


def generate_o365_like(root: str, num_images: int, seed: int = 0) -> tuple[str, str]:
    """Write `root/annotations/zhiyuan_objv2_train.json` and `root/images/patchN/objects365_v1_*.jpg`.
    Returns (annotations path, images root). Idempotent: a finished source (marker file) is reused."""
    ann_path = os.path.join(root, "annotations", "zhiyuan_objv2_train.json")
    img_root = os.path.join(root, "images")
    marker = os.path.join(root, ".complete")
    if os.path.exists(marker):
        return ann_path, img_root
    os.makedirs(os.path.dirname(ann_path), exist_ok=True)
    rng = np.random.default_rng(seed)
    jpegs = _jpegs()
    kinds = rng.integers(0, len(SIZES), num_images)
    nboxes = rng.integers(5, 26, num_images)
    with open(ann_path + ".tmp", "w") as f:
        f.write('{"images": [')
        for i in range(num_images):
            image_id = i + 1
            w, h = SIZES[kinds[i]]
            rel = f"patch{i // PATCH}/objects365_v1_{image_id:08d}.jpg"
            path = os.path.join(img_root, rel)
            if i % PATCH == 0:
                os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as g:
                g.write(jpegs[kinds[i]])
            f.write(("," if i else "") + json.dumps({
                "height": h, "id": image_id, "license": 5, "width": w, "file_name": f"images/v1/{rel}",
                "url": f"http://example.invalid/{rel}"}))
        f.write('], "annotations": [')
        ann_id = 0
        for i in range(num_images):
            w, h = SIZES[kinds[i]]
            n = int(nboxes[i])
            xy = rng.uniform(0, 0.8, (n, 2)) * (w, h)
            wh = rng.uniform(0.05, 0.5, (n, 2)) * (w, h)
            cats = rng.integers(1, NUM_CLASSES + 1, n)
            parts = []
            for b in range(n):
                ann_id += 1
                bw, bh = round(float(wh[b, 0]), 2), round(float(wh[b, 1]), 2)
                parts.append(json.dumps({
                    "id": ann_id, "iscrowd": 0, "isfake": 0, "area": round(bw * bh, 3), "isreflected": 0,
                    "bbox": [round(float(xy[b, 0]), 2), round(float(xy[b, 1]), 2), bw, bh],
                    "image_id": i + 1, "category_id": int(cats[b])}))
            f.write(("," if i else "") + ",".join(parts))
        cats = [{"name": f"object_{c:03d}", "id": c} for c in range(1, NUM_CLASSES + 1)]
        f.write('], "categories": ' + json.dumps(cats) + ', "licenses": [{"id": 5, "name": "x"}]}')
    os.replace(ann_path + ".tmp", ann_path)
    with open(marker, "w") as g:
        g.write(str(num_images))
    return ann_path, img_root


_RUNNER = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import ray
from pipeline.data.shards import build_shards
ann, images, out, parallel = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "1"
if parallel:
    ray.init(num_cpus=int(sys.argv[6]), include_dashboard=False, log_to_driver=False)
t0 = time.perf_counter()
m = build_shards(ann, images, out, "train", rows_per_shard=1000, parallel=parallel, verbose=False)
wall = time.perf_counter() - t0
print("RESULT " + json.dumps({"wall_s": wall, "images": m.splits["train"].num_images,
      "boxes": m.splits["train"].num_boxes, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_build(code: str, ann: str, images: str, out: str, parallel: bool, num_cpus: int) -> dict:
    # PYTHONPATH and cwd, not only the runner's sys.path: Ray's worker processes inherit the environment and put
    # the driver's working directory first on their path; otherwise they would import this checkout's (or the
    # installed) `pipeline`, not `code`'s
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (code, os.environ.get("PYTHONPATH")) if p)}
    return run([sys.executable, "-c", _RUNNER, code, ann, images, out, "1" if parallel else "0", str(num_cpus)],
               what="build", env=env, cwd=code)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.03])
    p.add_argument("--work", default="/tmp/o365scale", help="sources (kept, reused) and shards (rebuilt)")
    p.add_argument("--code", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   help="checkout root whose `pipeline` package builds (default: this one)")
    p.add_argument("--serial", action="store_true", help="build in the driver process, without Ray")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    args = p.parse_args(argv)
    rows = []
    for frac in args.fractions:
        n = max(1, round(O365_TRAIN_IMAGES * frac))
        t0 = time.perf_counter()
        ann, images = generate_o365_like(os.path.join(args.work, f"src-{n}"), n)
        gen = time.perf_counter() - t0
        out = os.path.join(args.work, f"shards-{n}")
        subprocess.run(["rm", "-rf", out], check=True)
        r = run_build(args.code, ann, images, out, not args.serial, args.num_cpus)
        r.update(fraction=frac, json_mb=os.path.getsize(ann) / 2**20)
        rows.append(r)
        print(f"fraction {frac:g}: {r['images']} images, {r['boxes']} boxes, JSON {r['json_mb']:.0f} MB "
              f"(source ready in {gen:.0f} s): build {r['wall_s']:.1f} s, {r['images'] / r['wall_s']:.0f} img/s, "
              f"driver peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        slope = (b["peak_rss_mb"] - a["peak_rss_mb"]) / max(1, b["images"] - a["images"])
        full = b["peak_rss_mb"] + slope * (O365_TRAIN_IMAGES - b["images"])
        rate = b["images"] / b["wall_s"]
        print(f"extrapolated to the full set ({O365_TRAIN_IMAGES} images): driver peak RSS ~{full / 1024:.2f} GB "
              f"({slope * 1024:.2f} KB per image), ~{O365_TRAIN_IMAGES / rate / 3600:.1f} h at {rate:.0f} img/s")
    with open("/proc/loadavg") as f:
        print(f"load average: {f.read().strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
