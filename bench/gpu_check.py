"""GPU check: what only a GPU can tell, in one script and one readable report (under 8 minutes on one GPU).

Run on a machine with one GPU (or on CPU: the GPU parts are skipped with the reason printed):
    cd /work/main && .venv/bin/python bench/gpu_check.py
    .venv/bin/python bench/gpu_check.py --sections deform_attn     # one section

Sections (each prints its own block; a failing section is reported and the next one still runs):
  environment  - torch / triton / device.
  deform_attn  - deformable attention: forward+backward time, peak memory and max difference of the Triton
                 kernel and the PyTorch kernel against the grid_sample reference, at the Co-DINO R50 decoder
                 (B=2, Q=900 + 200 denoising) and encoder (B=2, S=Q=89,023) shapes, fp32 and bf16 autocast.
  train_step   - bf16 training step of Co-DINO R50 at 800x1333, batch 2, K = 0 / 1 / 2: images/s, peak memory,
                 ratios to K = 0; fp32 loss terms under autocast.
  collectives  - every pipeline.dist helper under NCCL and the mixed cpu:gloo,cuda:nccl backend (world size 1).
Exit status 1 if any check failed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

FAILURES: list[str] = []


def report(line: str = "") -> None:
    print(line, flush=True)


def check(ok: bool, what: str) -> None:
    """Print PASS / FAIL for one check; failures make the exit status 1."""
    report(f"    [{'PASS' if ok else 'FAIL'}] {what}")
    if not ok:
        FAILURES.append(what)


def cuda_time(fn: Callable[[], object], warmup: int, reps: int) -> float:
    """Median milliseconds of fn() on the current CUDA stream (CUDA events)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


# ------------------------------------------------------------------------------------------ environment

def section_environment(args: argparse.Namespace) -> None:
    report(f"  torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    try:
        import triton

        report(f"  triton {triton.__version__}")
    except ImportError as e:
        report(f"  triton not importable ({e}): the deformable attention falls back to the PyTorch kernel")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        report(f"  device 0: {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, "
               f"{torch.cuda.device_count()} device(s)")


# ---------------------------------------------------------------------------------- deformable attention

def _deform_case(case: str, batch: int, device: torch.device, scale: float, dn_queries: int):
    from deform_attn import level_shapes, make_inputs

    shapes = level_shapes(scale)
    S = int(shapes.prod(1).sum())
    Q = S if case == "encoder" else 900 + dn_queries
    value, loc, weights = make_inputs(case, shapes, batch, Q, device)
    return shapes.to(device), [tuple(p) for p in shapes.tolist()], value, loc, weights


def section_deform_attn(args: argparse.Namespace) -> None:
    from pipeline.models.layers import deform_attn

    on_gpu = torch.cuda.is_available() and not args.cpu
    if not on_gpu:
        report("  SKIPPED timings: no CUDA device (or --cpu). Running a tiny CPU smoke case of the same code "
               "path instead (not a measurement).")
    device = torch.device("cuda" if on_gpu else "cpu")
    kernels = ["reference", "pytorch"]
    if on_gpu:
        if deform_attn._triton_available():
            kernels.insert(1, "triton")
        else:
            report("  triton not importable: Triton kernel skipped (the model uses the PyTorch kernel on CUDA)")
        report(f"  auto-selected kernel on {device}: {deform_attn._pick_impl(torch.empty(1, device=device), None)}")
    scale = 1.0 if on_gpu else 0.05
    reps, warmup = (10, 2) if on_gpu else (1, 0)
    header = (f"    {'case':8} {'dtype':5} {'kernel':9} {'fwd+bwd ms':>11} {'peak GiB':>9} {'max|d out|':>11} "
              f"{'max|d gv|':>10} {'max|d gloc|':>11} {'max|d gw|':>10}")
    for case in ("decoder", "encoder"):
        shapes, hw, value, loc, weights = _deform_case(case, 2, device, scale, args.dn_queries)
        B, Q = value.shape[0], loc.shape[1]
        report(f"  {case}: B={B}, S={value.shape[1]}, Q={Q}, levels {hw}")
        report(header)
        for dtype_name in ("fp32", "bf16"):
            bf16 = dtype_name == "bf16"
            v = value.bfloat16() if bf16 else value  # as in the model: value_proj output bf16, the rest fp32
            grad = torch.randn(B, Q, 256, device=device, generator=None)
            grad = grad.bfloat16() if bf16 else grad
            # Ground truth: the grid_sample reference in float64 on the same (bf16-rounded) numbers.
            ref_in = [t.double().requires_grad_() for t in (v, loc, weights)]
            ref_out = deform_attn.multi_scale_deformable_attn_reference(ref_in[0], shapes, ref_in[1], ref_in[2],
                                                                        hw)
            ref_grads = torch.autograd.grad(ref_out, ref_in, grad.double())
            ref_out = ref_out.detach()
            del ref_in
            for kernel in kernels:
                inputs = [t.detach().requires_grad_() for t in (v, loc, weights)]

                def step(inputs=inputs, kernel=kernel, bf16=bf16, shapes=shapes, hw=hw, grad=grad):
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                        out = deform_attn.multi_scale_deformable_attn(inputs[0], shapes, inputs[1], inputs[2], hw,
                                                                      impl=kernel)
                    grads = torch.autograd.grad(out, inputs, grad.to(out.dtype))
                    return out, grads

                try:
                    if on_gpu:
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        ms = cuda_time(step, warmup, reps)
                        peak = torch.cuda.max_memory_allocated() / 2**30
                    else:
                        start = time.perf_counter()
                        step()
                        ms, peak = (time.perf_counter() - start) * 1e3, float("nan")
                    out, grads = step()
                except torch.cuda.OutOfMemoryError as e:  # report and go on with the next kernel
                    report(f"    {case:8} {dtype_name:5} {kernel:9} out of memory: {str(e).splitlines()[0]}")
                    FAILURES.append(f"deform_attn {case} {dtype_name} {kernel}: OOM")
                    torch.cuda.empty_cache()
                    continue
                diffs = [(a.double() - b).abs().max().item() for a, b in zip((out, *grads), (ref_out, *ref_grads))]
                report(f"    {case:8} {dtype_name:5} {kernel:9} {ms:11.2f} {peak:9.2f} " +  # max |ours - fp64 ref|
                       " ".join(f"{d:10.2e}" for d in diffs))
                # Tolerance: fp32 accumulation; bf16 rounding of the output (and value gradient) when bf16.
                # Location gradients jump at pixel borders (one-sided derivatives), so they are reported only.
                tol = 2e-2 if bf16 else 1e-3
                scale_out = ref_out.abs().max().item()
                check(diffs[0] <= tol * scale_out and diffs[3] <= tol * ref_grads[2].abs().max().item(),
                      f"{case} {dtype_name} {kernel}: output and attention-weight gradient within {tol:g} "
                      f"(relative to max) of the float64 reference")
                del out, grads, inputs
                if on_gpu:
                    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------- training step

def section_train_step(args: argparse.Namespace) -> None:
    """bf16 training step of Co-DINO R50 at 800x1333 (batch 2, 20 boxes each), K = 0, 1, 2: images/s and peak
    memory, ratios to K = 0; checks that every loss term comes out fp32 under autocast and that the step is finite."""
    if args.cpu or not torch.cuda.is_available():
        report("  skipped: no CUDA device (the training step is measured only on a GPU)")
        return
    from pipeline.config import load_config, replace
    from pipeline.models import build_model
    from pipeline.train.steps import autocast_context

    device = torch.device("cuda")
    batch, (h, w) = 2, (800, 1333)
    base = load_config(str(ROOT / "configs/model/co_dino_r50.yaml")).model
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, h, w, generator=g).to(device)
    targets = []
    for _ in range(batch):
        cxcy = torch.rand(20, 2, generator=g) * 0.8 + 0.1
        wh = torch.rand(20, 2, generator=g) * 0.3 + 0.02
        targets.append({"boxes": torch.cat([cxcy, wh], 1).to(device),
                        "labels": torch.randint(0, base.num_classes, (20,), generator=g).to(device),
                        "size": torch.tensor([h, w], device=device)})
    results: dict[int, tuple[float, float]] = {}
    for heads in ((), ("atss",), ("atss", "faster_rcnn")):
        cfg = replace(base, **{"backbone.pretrained": False, "co.aux_heads": heads})
        torch.manual_seed(0)
        model = build_model(cfg).to(device).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

        def step(model: torch.nn.Module = model, opt: torch.optim.Optimizer = opt) -> dict[str, torch.Tensor]:
            with autocast_context(device, "bf16"):
                losses = model(images, None, targets)
            losses = {k: v.float() for k, v in losses.items()}  # as steps.backward_micro_batch
            sum(v for k, v in losses.items() if "loss" in k).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return losses

        with autocast_context(device, "bf16"):
            raw = model(images, None, targets)
        low = sorted(k for k, v in raw.items() if v.is_floating_point() and v.dtype != torch.float32)
        check(not low, f"K={len(heads)}: the model returns fp32 loss terms under bf16 autocast {low[:5]}")
        del raw
        opt.zero_grad(set_to_none=True)
        torch.cuda.reset_peak_memory_stats()
        ms = cuda_time(step, warmup=2, reps=5)
        losses = step()
        check(all(bool(torch.isfinite(v)) for v in losses.values()), f"K={len(heads)}: finite losses")
        results[len(heads)] = (batch / (ms / 1000), torch.cuda.max_memory_allocated() / 2**30)
        del model, opt
        torch.cuda.empty_cache()
    ips0, mem0 = results[0]
    report(f"  {'K':>3} {'images/s':>9} {'peak GiB':>9} {'step time / K=0':>16} {'peak / K=0':>11}")
    for k, (ips, mem) in results.items():
        report(f"  {k:>3} {ips:9.2f} {mem:9.2f} {ips0 / ips:16.2f} {mem / mem0:11.2f}")


# ------------------------------------------------------------------------------------------- collectives

def section_collectives(args: argparse.Namespace) -> None:
    """Every pipeline.dist helper with the tensors the loop passes, under NCCL and under the mixed backend the
    trainer initialises for GPU runs (world size 1)."""
    report("  proves: each pipeline.dist helper accepts what the loop passes (CUDA loss normalisers, the bool/int\n"
           "  agreements, object lists) under 'nccl' and 'cpu:gloo,cuda:nccl', and puts its own tensors on the GPU.\n"
           "  does not prove: pairing across ranks, multi-node NCCL transport, timeouts (needs >= 2 GPUs).")
    if args.cpu or not torch.cuda.is_available():
        report("  skipped: no CUDA device")
        return
    import os

    import torch.distributed as tdist

    from pipeline import dist as pcoll

    torch.cuda.set_device(0)
    for i, backend in enumerate(("nccl", pcoll.torch_backend(use_gpu=True))):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29611 + i))
        tdist.init_process_group(backend, rank=0, world_size=1)
        try:
            check(pcoll.collective_device().type == "cuda", f"{backend}: helper tensors on CUDA")
            check(float(pcoll.reduce_mean(torch.tensor(3.0, device="cuda"))) == 3.0, f"{backend}: reduce_mean(cuda)")
            finite = torch.isfinite(torch.tensor([1.0], device="cuda")).all()
            check(pcoll.all_agree(finite) and pcoll.all_agree(True), f"{backend}: all_agree (tensor and bool)")
            check(pcoll.all_gather_objects([1, 2]) == [[1, 2]], f"{backend}: all_gather_objects")
            check(pcoll.gather_objects({"n": 1}) == [{"n": 1}], f"{backend}: gather_objects")
            check(pcoll.broadcast_object("ckpt") == "ckpt", f"{backend}: broadcast_object")
        finally:
            tdist.destroy_process_group()


SECTIONS: dict[str, Callable[[argparse.Namespace], None]] = {
    "environment": section_environment,
    "deform_attn": section_deform_attn,
    "train_step": section_train_step,
    "collectives": section_collectives,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    parser.add_argument("--cpu", action="store_true", help="skip the GPU parts even if a GPU is present")
    parser.add_argument("--dn-queries", type=int, default=200,
                        help="denoising queries added to the 900 decoder queries (2 x num_dn_queries=100)")
    args = parser.parse_args()
    names = args.sections.split(",")
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; expected some of {list(SECTIONS)}")
    t0 = time.perf_counter()
    for name in names:
        report(f"\n== {name} ==")
        start = time.perf_counter()
        try:
            SECTIONS[name](args)
        except Exception:  # one broken section must not hide the others' results
            report(traceback.format_exc())
            FAILURES.append(f"section {name} raised")
        report(f"  ({time.perf_counter() - start:.0f} s)")
    report(f"\n== summary: {len(FAILURES)} failure(s) in {time.perf_counter() - t0:.0f} s ==")
    for f in FAILURES:
        report(f"  FAIL {f}")
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
