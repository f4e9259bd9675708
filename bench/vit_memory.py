"""Memory and speed of the authors' ViT-L (pipeline/models/backbones/vit.py) + SFP: forward + backward, window vs
global attention, with and without activation checkpointing.

    python bench/vit_memory.py                      # CPU section (reduced size) + GPU section (skipped: no CUDA)
    python bench/vit_memory.py --cpu-depth 4 --cpu-sizes 512 768 --gpu-sizes 1024 1536

Each configuration runs in a fresh subprocess (so its peak RSS is its own) and reports:
- `saved_MiB`: bytes of the activations autograd keeps for backward (saved-tensor hooks, storages counted once,
  parameters left out) -- the memory that window attention and checkpointing change, the same on any device
  (with checkpointing: the block / branch inputs; the one block recomputed at a time in backward is not in it);
- `peak_MiB`: CPU: the subprocess's peak RSS (model, grads, activations, allocator slack); GPU:
  torch.cuda.max_memory_allocated;
- `fwd_bwd_s`: wall time of one forward + backward (median of --repeat, after one warm-up on GPU).
Attention: "window" = the recipe's pattern (COCO: 24x24 windows, global blocks 3, 7, 11, 15, 19, 23; with fewer
blocks every 4th block is global), "global" = window_size 0 (every block global, as timm's EVA-02).

CPU section (reduced size, stated in its header): ViT-L width (embed 1024, 16 heads, SwiGLU 2730) with --cpu-depth
blocks (default 4: global block 3) at --cpu-sizes (default 512, 768 px square, batch 1), float32.
GPU section: the full ViT-L (24 blocks) + SFP at --gpu-sizes (default 1024, 1536), batch 1, bf16 autocast.
The last line is one JSON object with every row.
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def _global_blocks(depth: int) -> list[int]:
    return [i for i in range(depth) if i % 4 == 3]  # the COCO recipe's pattern: 3, 7, ..., 23


def run_one(depth: int, size: int, attn: str, ckpt: bool, device: str, repeat: int) -> dict:
    """One configuration in this process: returns its row."""
    import torch

    from pipeline.models.backbones.vit import ViT
    from pipeline.models.necks.sfp import SFP

    torch.manual_seed(0)
    window = 24 if attn == "window" else 0
    vit = ViT(depth=depth, window_size=window, global_blocks=_global_blocks(depth), drop_path_rate=0.0,
              checkpointing=ckpt).to(device)  # fmt: skip
    sfp = SFP(1024, 256, checkpointing=ckpt).to(device)
    images = torch.randn(1, 3, size, size, device=device)
    saved: dict[int, int] = {}
    weights = {q.untyped_storage().data_ptr() for q in list(vit.parameters()) + list(sfp.parameters())}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in weights:  # activations only (the parameters are saved by reference)
                saved[ptr] = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    def step(count: bool) -> float:
        for p in list(vit.parameters()) + list(sfp.parameters()):
            p.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")
        if count:
            with autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                outs = sfp(vit(images))
        else:
            with autocast:
                outs = sfp(vit(images))
        sum(o.float().square().mean() for o in outs).backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    if device == "cuda":
        step(False)  # warm-up (kernels, allocator)
        torch.cuda.reset_peak_memory_stats()
    times = [step(count=(i == 0)) for i in range(repeat)]
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    tokens = (size // 16) ** 2
    return {"device": device, "depth": depth, "size": size, "tokens": tokens, "attn": attn, "checkpointing": ckpt,
            "saved_MiB": round(sum(saved.values()) / 2**20, 1), "peak_MiB": round(peak, 1),
            "fwd_bwd_s": round(statistics.median(times), 3)}  # fmt: skip


def _subprocess_row(args: list[str]) -> dict:
    res = subprocess.run([sys.executable, __file__, "--one", *args], capture_output=True, text=True)
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or ["?"])[-1][:300], "args": args}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _loadavg() -> list[str]:
    with open("/proc/loadavg") as f:
        return f.read().split()[:3]


def _table(rows: list[dict]) -> None:
    print(f"{'size':>5} {'tokens':>6} {'attn':>7} {'ckpt':>5} {'saved MiB':>10} {'peak MiB':>10} {'fwd+bwd s':>10}")
    for r in rows:
        if "error" in r:
            print(f"  error {r['args']}: {r['error']}")
            continue
        print(f"{r['size']:>5} {r['tokens']:>6} {r['attn']:>7} {str(r['checkpointing']):>5} {r['saved_MiB']:>10} "
              f"{r['peak_MiB']:>10} {r['fwd_bwd_s']:>10}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-depth", type=int, default=4)
    p.add_argument("--cpu-sizes", type=int, nargs="+", default=[512, 768])
    p.add_argument("--gpu-sizes", type=int, nargs="+", default=[1024, 1536])
    p.add_argument("--repeat", type=int, default=1, help="timed forward+backward runs per configuration")
    p.add_argument("--skip-cpu", action="store_true")
    p.add_argument("--one", nargs=6, metavar=("DEPTH", "SIZE", "ATTN", "CKPT", "DEVICE", "REPEAT"),
                   help=argparse.SUPPRESS)  # fmt: skip
    args = p.parse_args()
    if args.one:
        depth, size, attn, ckpt, device, repeat = args.one
        print(json.dumps(run_one(int(depth), int(size), attn, ckpt == "1", device, int(repeat))))
        return

    import torch

    rows: list[dict] = []
    print(f"load average: {_loadavg()}  torch threads: {torch.get_num_threads()}")
    if not args.skip_cpu:
        print(f"\n== CPU (reduced size): ViT-L width (1024, 16 heads), {args.cpu_depth} blocks (global "
              f"{_global_blocks(args.cpu_depth)}), + SFP, batch 1, float32, sizes {args.cpu_sizes} ==")
        cpu = []
        for s in args.cpu_sizes:
            for a in ("window", "global"):
                for c in ("0", "1"):
                    cpu.append(_subprocess_row([str(args.cpu_depth), str(s), a, c, "cpu", str(args.repeat)]))
                    print(f"  done: {json.dumps(cpu[-1])}  load {_loadavg()}", flush=True)
        _table(cpu)
        rows += cpu
    print(f"\n== GPU: ViT-L (24 blocks, COCO pattern) + SFP, batch 1, bf16 autocast, sizes {args.gpu_sizes} ==")
    if not torch.cuda.is_available():
        print("skipped: no CUDA")
    else:
        print(f"device: {torch.cuda.get_device_name()}")
        gpu = [_subprocess_row(["24", str(s), a, c, "cuda", str(max(args.repeat, 3))])
               for s in args.gpu_sizes for a in ("window", "global") for c in ("0", "1")]  # fmt: skip
        _table(gpu)
        rows += gpu
    print(f"load average after: {_loadavg()}")
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
