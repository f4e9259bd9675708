"""Deployed cost of the collaborative heads: a K=2-trained model's deployed form vs a plain K=0 model (the paper:
the auxiliary heads are dropped at inference, so parameters and latency are identical). Both are built from the
same config (tiny by default) and timed interleaved in one run on the same inputs.

    python bench/deploy_cost.py                          # tiny config, CPU, one thread
    python bench/deploy_cost.py --size 224 320 --batch 2 --rounds 5 --threads 1
    python bench/deploy_cost.py --config configs/model/co_dino_r50.yaml --size 800 1216 --device cuda

Prints parameters (total, and of the inference state dict) and the median / min forward latency of each model, then
the K=2-deployed / K=0 ratios side by side, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.config import load_config  # noqa: E402
from pipeline.inference.model_io import deployed_model  # noqa: E402
from pipeline.models import build_model  # noqa: E402


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--config", default="configs/model/co_dino_tiny.yaml")
    p.add_argument("--size", type=int, nargs=2, default=[192, 256], metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config(args.config, []).model
    if not cfg.co.aux_heads:
        raise SystemExit(f"error: {args.config} has model.co.aux_heads=[]; the bench needs a K>0 config")
    k2 = build_model(cfg).eval()
    cfg0 = load_config(args.config, ["model.co.aux_heads=[]"]).model
    k0 = build_model(cfg0).eval()
    k2_deployed = deployed_model(k2)
    models = {"K=0": k0.to(args.device), f"K={len(cfg.co.aux_heads)} deployed": k2_deployed.to(args.device)}
    counts = {"K=2 trained (all)": params(k2), **{n: params(m) for n, m in models.items()}}
    inference = {n: sum(v.numel() for v in m.inference_state_dict().values()) for n, m in models.items()}
    h, w = args.size
    images = torch.randn(args.batch, 3, h, w, device=args.device)
    masks = torch.zeros(args.batch, h, w, dtype=torch.bool, device=args.device)
    times: dict[str, list[float]] = {n: [] for n in models}
    with torch.no_grad():
        for _ in range(args.warmup):
            for m in models.values():
                m(images, masks)
        for _ in range(args.rounds):
            for n, m in models.items():
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                m(images, masks)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times[n].append(time.perf_counter() - t0)
    print(f"{'model':>22s} {'params':>12s} {'inference sd':>13s} {'median ms':>10s} {'min ms':>8s}")
    print(f"{'K=2 trained (all)':>22s} {counts['K=2 trained (all)']:>12,d}")
    for n in models:
        print(f"{n:>22s} {counts[n]:>12,d} {inference[n]:>13,d} {1e3 * statistics.median(times[n]):>10.1f} "
              f"{1e3 * min(times[n]):>8.1f}")
    names = list(models)
    ratio_params = counts[names[1]] / counts[names[0]]
    ratio_median = statistics.median(times[names[1]]) / statistics.median(times[names[0]])
    ratio_min = min(times[names[1]]) / min(times[names[0]])
    print(f"ratio {names[1]} / K=0: params {ratio_params:.4f}, latency median {ratio_median:.3f}, min {ratio_min:.3f}")
    print(json.dumps({"config": args.config, "size": args.size, "batch": args.batch, "device": args.device,
                      "params": counts, "inference_params": inference,
                      "median_ms": {n: round(1e3 * statistics.median(t), 2) for n, t in times.items()},
                      "min_ms": {n: round(1e3 * min(t), 2) for n, t in times.items()},
                      "ratio_params": round(ratio_params, 6), "ratio_latency_median": round(ratio_median, 4),
                      "ratio_latency_min": round(ratio_min, 4)}))


if __name__ == "__main__":
    main()
