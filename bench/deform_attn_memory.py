"""Deformable-attention kernel memory and bf16 accuracy: saved-for-backward bytes, peak RSS, gradient error.

Run (CPU, ~2 minutes):
    cd /work/main && .venv/bin/python bench/deform_attn_memory.py
Against an older version of the kernel (a copy of deform_attn.py, e.g. from git):
    git show HEAD~2:pipeline/models/layers/deform_attn.py > /tmp/deform_attn_old.py
    .venv/bin/python bench/deform_attn_memory.py --baseline /tmp/deform_attn_old.py

1. Saved bytes: every tensor the op hands to autograd for backward (torch.autograd.graph.saved_tensors_hooks),
   at the Co-DINO R50 800x1333 encoder shape (5 levels, strides 4..64, S = Q = 89,023 tokens, B=2, 8 heads,
   Dh=32, 4 points), on the meta device: exact byte counts without computing anything.
2. Peak RSS of one forward + backward of the encoder case at --rss-scale of the image side (each kernel in its
   own process; VmHWM reset through /proc/self/clear_refs, minus VmRSS before the call).
3. bf16 vs fp32: relative error (||g - g_ref|| / ||g_ref||) of the output and of the gradients w.r.t. value,
   sampling locations and attention weights under bf16 autocast, against the float64 reference on the same
   (bf16-rounded) numbers; "value bf16" = the model's case (value_proj output in bf16, locations and softmax
   weights in fp32), "all bf16" = every input in bf16. Points within 1e-3 pixel of a pixel border are left out
   of the location-gradient error (the derivative jumps there; the count is printed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from deform_attn import level_shapes, make_inputs  # noqa: E402

from pipeline.models.layers import deform_attn  # noqa: E402


def load_kernel(name: str, baseline: str | None):
    """fn(value, spatial_shapes, loc, weights, spatial_hw) for "new" (the PyTorch kernel) or "baseline"."""
    if name == "new":
        return lambda v, s, loc, w, hw: deform_attn.multi_scale_deformable_attn(v, s, loc, w, hw, impl="pytorch")
    spec = importlib.util.spec_from_file_location("deform_attn_baseline", baseline)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return lambda v, s, loc, w, hw: module.multi_scale_deformable_attn(v, s, loc, w)


def saved_bytes(fn, batch: int, value_dtype: torch.dtype) -> tuple[int, list[str]]:
    """Bytes saved for backward by one call at the full encoder shape, on the meta device."""
    shapes = level_shapes(1.0)
    hw = [tuple(p) for p in shapes.tolist()]
    S = int(shapes.prod(1).sum())
    meta = torch.device("meta")
    value = torch.empty(batch, S, 8, 32, device=meta, dtype=value_dtype, requires_grad=True)
    loc = torch.empty(batch, S, 8, 5, 4, 2, device=meta, requires_grad=True)
    weights = torch.empty(batch, S, 8, 5, 4, device=meta, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn(value, shapes, loc, weights, hw)
    total = sum(t.numel() * t.element_size() for t in saved)
    return total, [f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} {t.numel() * t.element_size() / 1e6:.0f} MB"
                   for t in saved]


def peak_rss_child(kernel: str, baseline: str | None, scale: float, batch: int) -> dict:
    """Runs in a subprocess: peak RSS increase (bytes) of one forward + backward of the encoder case."""
    fn = load_kernel(kernel, baseline)
    shapes = level_shapes(scale)
    hw = [tuple(p) for p in shapes.tolist()]
    S = int(shapes.prod(1).sum())
    value, loc, weights = (t.requires_grad_() for t in make_inputs("encoder", shapes, batch, S, torch.device("cpu")))
    grad = torch.randn(batch, S, 256)
    small = level_shapes(0.1)  # warm up allocator / kernels on a tiny case
    sv, sl, sw = (t.requires_grad_() for t in make_inputs("encoder", small, 1, int(small.prod(1).sum()),
                                                          torch.device("cpu")))
    fn(sv, small, sl, sw, [tuple(p) for p in small.tolist()]).sum().backward()

    def status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = status("VmRSS:")
    fn(value, shapes, loc, weights, hw).backward(grad)
    return {"S": S, "batch": batch, "peak_increase": status("VmHWM:") - before}


def peak_rss(kernel: str, baseline: str | None, scale: float, batch: int) -> dict:
    cmd = [sys.executable, __file__, "--rss-child", kernel, "--rss-scale", str(scale), "--batch", str(batch)]
    if baseline:
        cmd += ["--baseline", baseline]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def grad_errors(fn, case: str, scale: float, cast_all: bool) -> dict[str, float]:
    """Relative errors of the bf16-autocast op against float64 on the same numbers."""
    shapes = level_shapes(scale)
    hw = [tuple(p) for p in shapes.tolist()]
    S = int(shapes.prod(1).sum())
    Q = S if case == "encoder" else 900
    value, loc, weights = make_inputs(case, shapes, 1, Q, torch.device("cpu"), seed=1)
    value = value.bfloat16()
    if cast_all:
        loc, weights = loc.bfloat16(), weights.bfloat16()
    grad = torch.randn(1, Q, 256).bfloat16()
    inputs = [t.clone().requires_grad_() for t in (value, loc, weights)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(inputs[0], shapes, inputs[1], inputs[2], hw)
    grads = torch.autograd.grad(out, inputs, grad.to(out.dtype))
    ref_in = [t.double().requires_grad_() for t in (value, loc, weights)]
    ref = deform_attn.multi_scale_deformable_attn_reference(ref_in[0], shapes, ref_in[1], ref_in[2])
    ref_grads = torch.autograd.grad(ref, ref_in, grad.double())
    # Location gradients jump where a point crosses a pixel border (one-sided derivatives): points within
    # 1e-3 pixel of one are left out of that comparison, since fp32 rounding alone may put them on either side.
    pix = loc.double() * shapes.flip(-1).double().view(1, 1, 1, -1, 1, 2) - 0.5
    smooth = ((pix - pix.round()).abs() > 1e-3).all(-1, keepdim=True).expand_as(pix)
    names = ("out", "grad value", "grad loc", "grad weights")
    errs = {n: ((a.double() - b).norm() / b.norm()).item()
            for n, a, b in zip(names, (out, *grads), (ref, *ref_grads))}
    errs["grad loc"] = ((grads[1].double() - ref_grads[1])[smooth].norm() / ref_grads[1][smooth].norm()).item()
    errs["kink points left out"] = int((~smooth[..., 0]).sum())
    return errs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default=None, help="a deform_attn.py file to measure as 'baseline'")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rss-scale", type=float, default=0.5, help="image side multiplier for peak RSS")
    parser.add_argument("--err-scale", type=float, default=0.25, help="image side multiplier for bf16 errors")
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        print(json.dumps(peak_rss_child(args.rss_child, args.baseline, args.rss_scale, args.batch)))
        return
    kernels = ["new"] + (["baseline"] if args.baseline else [])
    print(f"torch {torch.__version__} threads={torch.get_num_threads()}")
    print(f"\n1. saved for backward, encoder 800x1333 (S=Q={int(level_shapes(1.0).prod(1).sum())}), "
          f"B={args.batch}, meta device")
    for k in kernels:
        fn = load_kernel(k, args.baseline)
        for dtype in (torch.float32, torch.bfloat16):
            total, parts = saved_bytes(fn, args.batch, dtype)
            print(f"  {k:9} value {str(dtype).replace('torch.', ''):9} {total / 1e9:6.3f} GB: {'; '.join(parts)}")
    print(f"\n2. peak RSS increase of one forward+backward, encoder case at scale {args.rss_scale}, B={args.batch}")
    for k in kernels:
        r = peak_rss(k, args.baseline, args.rss_scale, args.batch)
        print(f"  {k:9} S=Q={r['S']}: {r['peak_increase'] / 1e9:.3f} GB")
    print(f"\n3. bf16 autocast vs float64 on the same numbers, relative error (scale {args.err_scale}, B=1)")
    for case in ("decoder", "encoder"):
        for cast_all in (False, True):
            for k in kernels:
                errs = grad_errors(load_kernel(k, args.baseline), case, args.err_scale, cast_all)
                label = "all bf16" if cast_all else "value bf16"
                print(f"  {case:8} {label:10} {k:9} " + "  ".join(f"{n} {e:.2e}" if isinstance(e, float)
                                                                   else f"{n} {e}" for n, e in errs.items()))


if __name__ == "__main__":
    main()
