"""Training-step cost of the collaborative heads: step time and peak memory of K=1 (ATSS) and K=2 (ATSS + Faster
R-CNN) relative to K=0 (plain Co-DINO), same config, same batch, measured side by side in one run.

    python bench/train_step.py                                   # tiny config, CPU
    python bench/train_step.py --config configs/model/co_dino_r50.yaml --size 800 1216 --batch 2 --device cuda

The paper's ratios (GPU hours, 8 A100, R50): K=1 1.23x, K=2 1.71x time; K=2 1.12x memory. Each K runs in its own
subprocess (peak memory: CUDA max_memory_allocated, or the process's max RSS on CPU); the K values are
interleaved over `--rounds` rounds and the median step time per K is reported, so machine drift hits all alike.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADS = {"K=0": "[]", "K=1": "[atss]", "K=2": "[atss,faster_rcnn]"}


def worker(args: argparse.Namespace) -> None:
    """One K: build, warm up, time `--steps` optimizer steps; print one JSON line."""
    sys.path.insert(0, ROOT)
    import torch

    from pipeline.config import load_config
    from pipeline.models import build_model

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    job = load_config(args.config, [f"model.co.aux_heads={args.heads}", f"model.num_classes={args.classes}",
                                    "model.backbone.pretrained=false"])
    device = torch.device(args.device)
    model = build_model(job.model).to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    h, w = args.size
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, h, w, generator=g).to(device)
    masks = torch.zeros(args.batch, h, w, dtype=torch.bool, device=device)
    targets = []
    for _ in range(args.batch):
        n = args.boxes
        cxcy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        targets.append({"boxes": torch.cat([cxcy, wh], 1).to(device),
                        "labels": torch.randint(0, args.classes, (n,), generator=g).to(device),
                        "size": torch.tensor([h, w], device=device), "orig_size": torch.tensor([h, w], device=device)})
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and args.bf16 else None

    def step() -> None:
        if amp is not None:
            with amp:
                losses = model(images, masks, targets)
        else:
            losses = model(images, masks, targets)
        sum(v.float() for k, v in losses.items() if "loss" in k).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"times": times, "peak_bytes": peak, "params": params}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs/model/co_dino_tiny.yaml"))
    p.add_argument("--size", type=int, nargs=2, default=[256, 320], metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--boxes", type=int, default=6, help="ground-truth boxes per image")
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on CUDA")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--heads", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.heads is not None:
        worker(args)
        return
    results: dict[str, dict] = {k: {"times": [], "peak": []} for k in HEADS}
    base = [sys.executable, os.path.abspath(__file__), "--config", args.config, "--size", *map(str, args.size),
            "--batch", str(args.batch), "--boxes", str(args.boxes), "--classes", str(args.classes), "--steps",
            str(args.steps), "--warmup", str(args.warmup), "--device", args.device, "--threads", str(args.threads)]
    if args.bf16:
        base.append("--bf16")
    for r in range(args.rounds):
        for name, heads in HEADS.items():
            out = subprocess.run([*base, "--heads", heads], capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise SystemExit(f"{name} failed:\n{out.stderr[-2000:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results[name]["times"] += res["times"]
            results[name]["peak"].append(res["peak_bytes"])
            results[name]["params"] = res["params"]
            print(f"round {r + 1} {name}: median step {statistics.median(res['times']):.3f}s", flush=True)
    t0 = statistics.median(results["K=0"]["times"])
    m0 = max(results["K=0"]["peak"])
    print(f"\nconfig {os.path.relpath(args.config, ROOT)}, batch {args.batch} x {args.size[0]}x{args.size[1]}, "
          f"device {args.device}, {args.rounds} rounds x {args.steps} steps")
    print(f"{'':5s} {'params':>12s} {'step s':>8s} {'time ratio':>10s} {'peak MiB':>9s} {'mem ratio':>9s}  paper")
    paper = {"K=0": "1.00 / 1.00", "K=1": "1.23 / -", "K=2": "1.71 / 1.12"}
    for name, r in results.items():
        t, m = statistics.median(r["times"]), max(r["peak"])
        print(f"{name:5s} {r['params']:12,d} {t:8.3f} {t / t0:10.2f} {m / 2**20:9.0f} {m / m0:9.2f}  {paper[name]}")


if __name__ == "__main__":
    main()
