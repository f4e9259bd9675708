"""Training-step cost of the collaborative heads: step time and peak memory of K=1 (ATSS) and K=2 (ATSS + Faster
R-CNN) relative to K=0 (plain Co-DINO), same config, same batch, measured side by side in one run.

    python bench/train_step.py                                   # tiny config, CPU
    python bench/train_step.py --threads 1 --rounds 3            # one intra-op thread: steadiest on a shared CPU
    python bench/train_step.py --baseline /tmp/old_tree          # also time another checkout (holds pipeline/)
    python bench/train_step.py --profile K=2 --threads 1         # cProfile (CPU time) of one K, top functions
    python bench/train_step.py --ks K=0 K=1 K=2 K=3 K=6 --rounds 1   # K = 3..6 (paper Table 7) on request
    python bench/train_step.py --config configs/model/co_dino_r50.yaml --size 800 1216 --batch 2 --device cuda

The paper's ratios (GPU hours, 8 A100, R50): K=1 1.23x, K=2 1.71x time; K=2 1.12x memory. Each K runs in its own
subprocess (peak memory: CUDA max_memory_allocated, or the process's max RSS on CPU); the K values (and the
baseline tree's, with --baseline) are interleaved over `--rounds` rounds, each starting at the next K, and the median
step time per K over all its steps is reported, so machine drift hits all alike (defaults: 4 rounds x 4 steps, about
2 minutes here). On a shared 2-core CPU one run's wall-time ratio still moves by +-15 % (K = 2 over K = 0: 1.12-1.51
in five default runs of the same code): compare several runs. The CPU time of the process (time.process_time, all
threads; median and min over all steps) is printed beside it; --threads 1 is the steadiest (with 2 threads on a
loaded 2-core machine, OpenMP threads spin at barriers and both wall and CPU time grow several-fold).
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
HEADS = {"K=0": "[]", "K=1": "[atss]", "K=2": "[atss,faster_rcnn]", "K=3": "[atss,faster_rcnn,paa]",
         "K=4": "[atss,faster_rcnn,paa,gfl]", "K=5": "[atss,faster_rcnn,paa,gfl,fcos]",
         "K=6": "[atss,faster_rcnn,paa,gfl,fcos,retinanet]"}  # K = 3..6 on request (--ks), paper Table 7


def worker(args: argparse.Namespace) -> None:
    """One K: build, warm up, time `--steps` optimizer steps; print one JSON line."""
    sys.path.insert(0, args.root)
    import torch

    from pipeline.config import load_config
    from pipeline.models import build_model
    from pipeline.train.optim import build_optimizer

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    job = load_config(args.config, [f"model.co.aux_heads={args.heads}", f"model.num_classes={args.classes}",
                                    "model.backbone.pretrained=false"])
    device = torch.device(args.device)
    model = build_model(job.model).to(device).train()
    opt = build_optimizer(model, job.train)  # what training runs (fused AdamW, the config's lr groups)
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
    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile(timer=time.process_time)
        prof.enable()
        for _ in range(args.steps):
            step()
        prof.disable()
        stats = pstats.Stats(prof, stream=sys.stderr)
        stats.sort_stats("cumulative").print_stats(60)
        stats.sort_stats("tottime").print_stats(30)
        print(json.dumps({"times": [0.0], "cpu": [0.0], "peak_bytes": 0, "params": 0}))
        return
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, cpu = [], []
    for _ in range(args.steps):
        t, c = time.perf_counter(), time.process_time()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"times": times, "cpu": cpu, "peak_bytes": peak, "params": params}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs/model/co_dino_tiny.yaml"))
    p.add_argument("--size", type=int, nargs=2, default=[256, 320], metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--boxes", type=int, default=6, help="ground-truth boxes per image")
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--steps", type=int, default=4, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=4, help="rounds of one subprocess per K (the K order rotates)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on CUDA")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default)")
    p.add_argument("--ks", nargs="+", default=["K=0", "K=1", "K=2"], choices=list(HEADS),
                   help="which K to run (K=3..6 on request)")
    p.add_argument("--baseline", default=None,
                   help="another source tree (a directory holding pipeline/) timed interleaved with this one")
    p.add_argument("--profile", default=None, choices=list(HEADS),
                   help="cProfile (process CPU time) --steps steps of this K instead of timing; prints to stderr")
    p.add_argument("--heads", default=None, help=argparse.SUPPRESS)
    p.add_argument("--root", default=ROOT, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.heads is not None:
        worker(args)
        return
    base = [sys.executable, os.path.abspath(__file__), "--config", args.config, "--size", *map(str, args.size),
            "--batch", str(args.batch), "--boxes", str(args.boxes), "--classes", str(args.classes), "--steps",
            str(args.steps), "--warmup", str(args.warmup), "--device", args.device, "--threads", str(args.threads)]
    if args.bf16:
        base.append("--bf16")
    if args.profile:
        subprocess.run([*base, "--heads", HEADS[args.profile], "--profile", args.profile], check=True)
        return
    trees = {"": ROOT}
    if args.baseline:
        trees = {"": ROOT, "base ": os.path.abspath(args.baseline)}
    results: dict[str, dict] = {tag + k: {"times": [], "cpu": [], "peak": []} for tag in trees for k in args.ks}
    for r in range(args.rounds):
        order = args.ks[r % len(args.ks):] + args.ks[:r % len(args.ks)]  # no K always first (or last) in a round
        for tag, root in trees.items():
            for name in order:
                out = subprocess.run([*base, "--heads", HEADS[name], "--root", root], capture_output=True, text=True,
                                     check=False)
                if out.returncode != 0:
                    raise SystemExit(f"{tag}{name} failed:\n{out.stderr[-2000:]}")
                res = json.loads(out.stdout.strip().splitlines()[-1])
                entry = results[tag + name]
                entry["times"] += res["times"]
                entry["cpu"] += res["cpu"]
                entry["peak"].append(res["peak_bytes"])
                entry["params"] = res["params"]
                print(f"round {r + 1} {tag}{name}: median step {statistics.median(res['times']):.3f}s wall, "
                      f"{statistics.median(res['cpu']):.3f}s cpu", flush=True)
    print(f"\nconfig {os.path.relpath(args.config, ROOT)}, batch {args.batch} x {args.size[0]}x{args.size[1]}, "
          f"device {args.device}, threads {args.threads or 'default'}, {args.rounds} rounds x {args.steps} steps"
          f"{', baseline ' + trees['base '] if args.baseline else ''}")
    print(f"{'':10s} {'params':>12s} {'step s':>8s} {'ratio':>6s} {'cpu s':>7s} {'ratio':>6s} {'cpu min':>8s} "
          f"{'ratio':>6s} {'peak MiB':>9s} {'mem ratio':>9s}  paper time / mem")
    paper = {"K=0": "1.00 / 1.00", "K=1": "1.23 / -", "K=2": "1.71 / 1.12", **{f"K={k}": "- / -" for k in range(3, 7)}}
    for tag in trees:
        ref = results.get(tag + "K=0")
        for name in args.ks:
            r = results[tag + name]
            t, c, cm, m = statistics.median(r["times"]), statistics.median(r["cpu"]), min(r["cpu"]), max(r["peak"])
            t0, c0, cm0, m0 = ((statistics.median(ref["times"]), statistics.median(ref["cpu"]), min(ref["cpu"]),
                                max(ref["peak"])) if ref else (t, c, cm, m))
            print(f"{tag + name:10s} {r['params']:12,d} {t:8.3f} {t / t0:6.2f} {c:7.3f} {c / c0:6.2f} {cm:8.3f} "
                  f"{cm / cm0:6.2f} {m / 2**20:9.0f} {m / m0:9.2f}  {paper[name]}")


if __name__ == "__main__":
    main()
