"""Host syncs per training step of the tiny Co-DINO, broken down by call site (file:line inside pipeline/).

    python bench/host_syncs.py                                 # K=0 and K=2, CPU counter, tables on stdout
    python bench/host_syncs.py --heads K=0 --json /tmp/syncs.json
    python bench/host_syncs.py --device cuda                   # also torch.cuda.set_sync_debug_mode("warn")

One micro-step = `pipeline.train.steps.backward_micro_batch` (forward + backward, nonfinite="raise", accum=1) on
a batch of 2 random images (--size, default 128x160) with 3 and 5 boxes, configs/model/co_dino_tiny.yaml with
`model.co.aux_heads` set per K. A first step warms up (lazy init, caches), the second is counted.

CPU side: `pipeline.train.host_syncs.HostSyncCounter` wraps Tensor.item / tolist / cpu / numpy, int/float/bool/index
of a tensor, nonzero-like data-dependent shapes and bool-mask indexing, and attributes each call to the innermost
frame inside pipeline/ (on a GPU every one of them blocks the host until the device catches up; on the CPU a call
on what would be a host tensor on the GPU is counted too, see the counter's docstring).

GPU side (--device cuda): `torch.cuda.set_sync_debug_mode("warn")` makes CUDA itself warn on every synchronising
call (the ground truth, including syncs inside C++ that the CPU counter cannot see); the warnings of the counted
step are tallied by their Python file:line next to the CPU counter's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADS = {"K=0": "[]", "K=2": "[atss,faster_rcnn]"}
# the files of issue 16's "host syncs" part (query head, losses); the rest is listed for the owners
OWN_FILES = (
    "pipeline/models/query_head/matcher.py",
    "pipeline/models/query_head/denoising.py",
    "pipeline/models/query_head/dino_head.py",
    "pipeline/models/losses.py",
)


def make_batch(size: tuple[int, int], num_classes: int, device, boxes=(3, 5), seed: int = 0):
    """images (B, 3, h, w), masks (B, h, w) all valid, B targets with cxcywh normalised boxes."""
    import torch

    g = torch.Generator().manual_seed(seed)
    h, w = size
    b = len(boxes)
    images = torch.randn(b, 3, h, w, generator=g).to(device)
    masks = torch.zeros(b, h, w, dtype=torch.bool, device=device)
    targets = []
    for n in boxes:
        cxcy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        targets.append({"boxes": torch.cat([cxcy, wh], 1).to(device),
                        "labels": torch.randint(0, num_classes, (n,), generator=g).to(device),
                        "size": torch.tensor([h, w], device=device)})  # fmt: skip
    return images, masks, targets


def build(heads: str, config: str, overrides: list[str], device):
    import torch

    from pipeline.config import load_config
    from pipeline.models import build_model

    torch.manual_seed(0)
    job = load_config(config, [f"model.co.aux_heads={heads}", "model.backbone.pretrained=false", *overrides])
    return build_model(job.model).to(device).train(), job.model.num_classes


def count_step(model, batch, device, gpu_warn: bool = False):
    """Warm-up step, then one counted `backward_micro_batch`. Returns (HostSyncCounter, Counter of CUDA warnings)."""
    import torch

    from pipeline.train.host_syncs import HostSyncCounter
    from pipeline.train.steps import backward_micro_batch

    images, masks, targets = batch

    def step(i: int) -> None:
        backward_micro_batch(model, images, masks, targets, accum=1, device=device, amp="auto", step=i,
                             nonfinite="raise", no_sync=False)  # fmt: skip
        model.zero_grad(set_to_none=True)

    step(0)
    cuda_warns: Counter[str] = Counter()
    if gpu_warn:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught, HostSyncCounter() as counter:
            warnings.simplefilter("always")
            step(1)
    finally:
        if gpu_warn:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            path = os.path.relpath(w.filename, ROOT) if w.filename.startswith(ROOT) else w.filename
            cuda_warns[f"{path}:{w.lineno}"] += 1
    return counter, cuda_warns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(ROOT, "configs/model/co_dino_tiny.yaml"))
    ap.add_argument("--heads", nargs="*", default=list(HEADS), choices=list(HEADS))
    ap.add_argument("--size", type=int, nargs=2, default=(128, 160))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--set", nargs="*", default=[], help="extra config overrides a.b=c")
    ap.add_argument("--json", default=None, help="write {K: {total, own, sites}} here")
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    import torch

    device = torch.device(args.device)
    report = {}
    for k in args.heads:
        model, nc = build(HEADS[k], args.config, args.set, device)
        counter, cuda_warns = count_step(model, make_batch(tuple(args.size), nc, device), device,
                                         gpu_warn=device.type == "cuda")  # fmt: skip
        own = counter.total_under(*OWN_FILES)
        print(f"== {k}: {counter.total} host syncs per micro-step ({own} in {', '.join(OWN_FILES)})")
        print(counter.table())
        if device.type == "cuda":
            print(f"-- CUDA sync warnings: {sum(cuda_warns.values())}")
            for site, n in cuda_warns.most_common():
                print(f"{n:6d}  {site}")
        report[k] = {"total": counter.total, "own": own, "cuda_warnings": sum(cuda_warns.values()),
                     "sites": [{"site": s, "kind": kind, "n": n} for (s, kind), n in counter.by_site().items()],
                     "cuda_sites": dict(cuda_warns)}  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
