"""Deformable-attention kernels timed against each other, forward and forward+backward.

Run (CPU, a few minutes; the encoder case is shrunk to half the image side):
    cd /work/main && .venv/bin/python bench/deform_attn.py --scale 0.5
The kernel against an older version of itself (a copy of deform_attn.py, e.g. from git):
    git show HEAD~1:pipeline/models/layers/deform_attn.py > /tmp/deform_attn_old.py
    .venv/bin/python bench/deform_attn.py --scale 0.5 --kernels pytorch,baseline --baseline /tmp/deform_attn_old.py
Full Co-DINO R50 size on a GPU:
    .venv/bin/python bench/deform_attn.py --device cuda --scale 1.0 --kernels triton,pytorch,reference

Shapes: 5 levels of an 800x1333 image (strides 4..64 -> (200,334),(100,167),(50,84),(25,42),(13,21):
89,023 value tokens; without the stride-4 level it would be 22,223), C=256, 8 heads, Dh=32, 4 points.
Cases: "decoder" (Q=900 queries, 4-d boxes) and "encoder" (Q=S, every token queries). --scale multiplies
the image side, so the encoder case costs ~scale^4. Kernels (--kernels, the first two are compared):
pytorch / triton / reference (grid_sample) from pipeline.models.layers.deform_attn, baseline =
`multi_scale_deformable_attn` of the file given by --baseline. All run in the same process, interleaved
rep by rep; the table shows medians and first/second (below 1 = the first is faster).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.models.layers.deform_attn import multi_scale_deformable_attn  # noqa: E402

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
    hw = [tuple(p) for p in shapes.tolist()]  # the Python ints a model passes as spatial_hw
    _sync(device)
    start = clock()
    if backward:
        fn(value, shapes, loc, weights, spatial_hw=hw).backward(grad)
    else:
        with torch.no_grad():
            fn(value, shapes, loc, weights, spatial_hw=hw)
    _sync(device)
    return clock() - start


def _without_hw(fn):
    """An older kernel without the `spatial_hw` argument."""
    return lambda value, shapes, loc, weights, spatial_hw: fn(value, shapes, loc, weights)


def load_kernels(names: list[str], baseline: str | None) -> dict:
    """name -> fn(value, spatial_shapes, sampling_locations, attention_weights, spatial_hw)."""
    kernels = {}
    for name in names:
        if name == "baseline":
            if not baseline:
                raise SystemExit("--kernels baseline needs --baseline FILE")
            spec = importlib.util.spec_from_file_location("deform_attn_baseline", baseline)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            kernels[name] = _without_hw(module.multi_scale_deformable_attn)
        elif name in ("pytorch", "triton", "reference"):
            kernels[name] = functools.partial(multi_scale_deformable_attn, impl=name)
        else:
            raise SystemExit(f"--kernels: unknown kernel {name!r}, expected pytorch, triton, reference, baseline")
    if len(kernels) < 2:
        raise SystemExit(f"--kernels needs at least two kernels to compare, got {names}")
    return kernels


def bench_case(case: str, args: argparse.Namespace, device: torch.device) -> list[tuple]:
    shapes = level_shapes(args.scale).to(device)
    S = int(shapes.prod(1).sum())
    Q = S if case == "encoder" else args.queries
    inputs = make_inputs(case, shapes.cpu(), args.batch, Q, device)
    kernels = args.kernel_fns
    first, second = list(kernels)[:2]
    # Sanity: same numbers before timing anything.
    hw = [tuple(p) for p in shapes.tolist()]
    with torch.no_grad():
        diff = (kernels[first](inputs[0], shapes, *inputs[1:], spatial_hw=hw) -
                kernels[second](inputs[0], shapes, *inputs[1:], spatial_hw=hw)).abs().max().item()
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
        rows.append((case, S, Q, "fwd+bwd" if backward else "fwd", med, med[first] / med[second], diff))
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
    parser.add_argument("--kernels", default="pytorch,reference",
                        help="comma list of pytorch,triton,reference,baseline; the first two are compared")
    parser.add_argument("--baseline", default=None, help="a deform_attn.py file to time as kernel 'baseline'")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with process CPU time instead of wall time (steadier on a shared machine)")
    args = parser.parse_args()
    if args.cpu_time and args.device != "cpu":
        parser.error(f"--cpu-time needs --device cpu, got --device {args.device}")
    args.clock = time.process_time if args.cpu_time else time.perf_counter
    args.kernel_fns = load_kernels(args.kernels.split(","), args.baseline)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    full = int(level_shapes(1.0).prod(1).sum())
    clock = "cpu" if args.cpu_time else "wall"
    print(f"torch {torch.__version__} device={device} threads={torch.get_num_threads()} batch={args.batch} "
          f"scale={args.scale} clock={clock}")
    print(f"full 800x1333 image: {full} tokens, level shapes {level_shapes(1.0).tolist()}")
    names = list(args.kernel_fns)
    ratio_name = f"{names[0]}/{names[1]}"
    print(f"{'case':8} {'S':>7} {'Q':>7} {'pass':8} " + " ".join(f"{n + ' ms':>13}" for n in names)
          + f" {ratio_name:>18} {'max|diff|':>10}")
    for case in args.cases.split(","):
        for row in bench_case(case, args, device):
            c, S, Q, kind, med, ratio, diff = row
            print(f"{c:8} {S:7d} {Q:7d} {kind:8} " + " ".join(f"{med[n]:13.1f}" for n in names)
                  + f" {ratio:18.3f} {diff:10.2e}")


if __name__ == "__main__":
    main()
