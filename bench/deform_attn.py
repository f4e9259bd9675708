"""Deformable-attention kernel vs the per-level grid_sample reference, forward and forward+backward.

Run (CPU, ~1 minute; the encoder case is shrunk to half the image side):
    cd /work/main && .venv/bin/python bench/deform_attn.py --scale 0.5
Full Co-DINO R50 size on a GPU:
    .venv/bin/python bench/deform_attn.py --device cuda --scale 1.0

Shapes: 5 levels of an 800x1333 image (strides 4..64 -> (200,334),(100,167),(50,84),(25,42),(13,21):
89,023 value tokens; without the stride-4 level it would be 22,223), C=256, 8 heads, Dh=32, 4 points.
Cases: "decoder" (Q=900 queries, 4-d boxes) and "encoder" (Q=S, every token queries). --scale multiplies
the image side, so the encoder case costs ~scale^4. Both kernels run in the same process, interleaved
rep by rep; the table shows medians and ours/reference (below 1 = ours faster).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.models.layers.deform_attn import (  # noqa: E402
    multi_scale_deformable_attn,
    multi_scale_deformable_attn_reference,
)

STRIDES = (4, 8, 16, 32, 64)


def level_shapes(scale: float) -> torch.Tensor:
    """(L, 2) (h, w) of the 5 levels of an 800x1333 image scaled by `scale` (ceil per stride, as conv s2)."""
    h, w = round(800 * scale), round(1333 * scale)
    return torch.tensor([(math.ceil(h / s), math.ceil(w / s)) for s in STRIDES])


def make_inputs(case: str, shapes: torch.Tensor, batch: int, num_queries: int, device: torch.device,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """value (B,S,8,32), sampling_locations (B,Q,8,5,4,2), attention_weights (B,Q,8,5,4), realistic spread."""
    g = torch.Generator().manual_seed(seed)
    nH, Dh, L, P = 8, 32, len(shapes), 4
    S = int(shapes.prod(1).sum())
    value = torch.randn(batch, S, nH, Dh, generator=g)
    if case == "encoder":  # every token queries around its own pixel centre, offsets of a few pixels
        refs = []
        for h, w in shapes.tolist():
            ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            refs.append(torch.stack([(xs.flatten() + 0.5) / w, (ys.flatten() + 0.5) / h], -1))
        ref = torch.cat(refs).expand(batch, S, 2)
        wh = shapes.flip(-1).float().view(1, 1, 1, L, 1, 2)
        offsets = torch.randn(batch, S, nH, L, P, 2, generator=g) * 2.0 / wh
    else:  # decoder: 4-d boxes, offsets within ~the box
        ref = torch.rand(batch, num_queries, 2, generator=g)
        box_wh = torch.rand(batch, num_queries, 1, 1, 1, 2, generator=g) * 0.3 + 0.02
        offsets = torch.randn(batch, num_queries, nH, L, P, 2, generator=g) * box_wh * 0.5
    loc = ref[:, :, None, None, None, :] + offsets
    weights = torch.randn(batch, loc.shape[1], nH, L * P, generator=g).softmax(-1).view(*loc.shape[:-1])
    return value.to(device), loc.to(device), weights.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_once(fn, inputs, shapes, grad, backward: bool, device: torch.device, clock) -> float:
    value, loc, weights = (t.detach().requires_grad_(backward) for t in inputs)
    _sync(device)
    start = clock()
    if backward:
        fn(value, shapes, loc, weights).backward(grad)
    else:
        with torch.no_grad():
            fn(value, shapes, loc, weights)
    _sync(device)
    return clock() - start


def bench_case(case: str, args: argparse.Namespace, device: torch.device) -> list[tuple]:
    shapes = level_shapes(args.scale)
    S = int(shapes.prod(1).sum())
    Q = S if case == "encoder" else args.queries
    inputs = make_inputs(case, shapes, args.batch, Q, device)
    kernels = {"ours": multi_scale_deformable_attn, "reference": multi_scale_deformable_attn_reference}
    # Sanity: same numbers before timing anything.
    with torch.no_grad():
        diff = (kernels["ours"](inputs[0], shapes, *inputs[1:]) -
                kernels["reference"](inputs[0], shapes, *inputs[1:])).abs().max().item()
    grad = torch.randn(args.batch, Q, 256, device=device)
    rows = []
    for backward in (False, True):
        times: dict[str, list[float]] = {k: [] for k in kernels}
        for rep in range(args.warmup + args.reps):
            for name, fn in kernels.items():  # interleaved: both see the same machine load
                t = run_once(fn, inputs, shapes, grad, backward, device, args.clock)
                if rep >= args.warmup:
                    times[name].append(t)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        rows.append((case, S, Q, "fwd+bwd" if backward else "fwd", med["ours"], med["reference"],
                     med["ours"] / med["reference"], diff))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="image side multiplier (encoder cost ~scale^4)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--queries", type=int, default=900, help="decoder queries")
    parser.add_argument("--cases", default="decoder,encoder", help="comma list of decoder,encoder")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with process CPU time instead of wall time (steadier on a shared machine)")
    args = parser.parse_args()
    if args.cpu_time and args.device != "cpu":
        parser.error(f"--cpu-time needs --device cpu, got --device {args.device}")
    args.clock = time.process_time if args.cpu_time else time.perf_counter
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    full = int(level_shapes(1.0).prod(1).sum())
    clock = "cpu" if args.cpu_time else "wall"
    print(f"torch {torch.__version__} device={device} threads={torch.get_num_threads()} batch={args.batch} "
          f"scale={args.scale} clock={clock}")
    print(f"full 800x1333 image: {full} tokens, level shapes {level_shapes(1.0).tolist()}")
    print(f"{'case':8} {'S':>7} {'Q':>7} {'pass':8} {'ours ms':>10} {'ref ms':>10} {'ours/ref':>9} "
          f"{'max|diff|':>10}")
    for case in args.cases.split(","):
        for row in bench_case(case, args, device):
            c, S, Q, kind, ours, ref, ratio, diff = row
            print(f"{c:8} {S:7d} {Q:7d} {kind:8} {ours:10.1f} {ref:10.1f} {ratio:9.2f} {diff:10.2e}")


if __name__ == "__main__":
    main()
