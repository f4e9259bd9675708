"""The annotation scan alone (`pipeline.data.shards.stream_source.scan_source`), this checkout against another,
side by side on one generated Objects365-like source: wall time and the Python peak (tracemalloc) per run.

    .venv/bin/python bench/scan_source.py --images 17000 --baseline /tmp/scan_old --rounds 3

Each run is a fresh subprocess that imports `pipeline` from its checkout (this one, or --baseline); runs are
interleaved round by round and the median per checkout is reported, so machine drift hits both alike. The source
comes from bench/shard_build_scale.py's generator (the Objects365 layout, 5..25 boxes per image) and is reused
from --work.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = """
import json, sys, time, tracemalloc
sys.path.insert(0, sys.argv[1])
from pipeline.data.shards.stream_source import scan_source
tracemalloc.start()
t0 = time.perf_counter()
index = scan_source(sys.argv[2], sys.argv[3])
wall = time.perf_counter() - t0
print(json.dumps({"wall_s": wall, "py_peak_mb": tracemalloc.get_traced_memory()[1] / 2**20,
                  "images": int(len(index.image_ids)), "boxes": int(index.num_boxes_in_source),
                  "sha256": index.sha256}))
"""


def run(code: str, ann: str, spill: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, code, ann, spill], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=17_000)
    ap.add_argument("--baseline", required=True, help="another checkout (holds pipeline/)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default="/tmp/scan_bench")
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from shard_build_scale import generate_o365_like

    ann, _ = generate_o365_like(os.path.join(args.work, f"src{args.images}"), args.images)
    print(f"source {ann}: {os.path.getsize(ann) / 2**20:.1f} MiB, {args.images} images; load "
          f"{os.getloadavg()[0]:.2f}")
    trees = {"this": ROOT, "baseline": args.baseline}
    res: dict[str, list[dict]] = {k: [] for k in trees}
    for r in range(args.rounds):
        for name, code in trees.items():
            res[name].append(run(code, ann, os.path.join(args.work, f"spill_{name}_{r}")))
            print(f"round {r} {name}: {res[name][-1]['wall_s']:.2f} s", flush=True)
    assert len({x["sha256"] for v in res.values() for x in v}) == 1, "the two scans read different bytes"
    assert len({(x["images"], x["boxes"]) for v in res.values() for x in v}) == 1, "the two scans disagree"
    med = {k: statistics.median(x["wall_s"] for x in v) for k, v in res.items()}
    for k, v in res.items():
        print(f"{k:9s} median {med[k]:.2f} s, python peak {max(x['py_peak_mb'] for x in v):.1f} MB")
    print(f"this / baseline = {med['this'] / med['baseline']:.2f}x; load {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
