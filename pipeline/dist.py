"""The one module that hands tensors and objects to `torch.distributed` (plain PyTorch; no Ray here).

Every collective of the project goes through these helpers: the loss normalisers (`reduce_mean`), the per-micro-step
agreements of the training loop (`all_agree`: every rank still has a batch; every rank's loss is finite), the
evaluation gather (`gather_objects`), the data-position gather (`all_gather_objects`) and the init broadcast
(`broadcast_object`). Outside a process group (a notebook, `num_workers=0`) they are the identity.

Backend choice (GPU runs). NCCL only accepts CUDA tensors, and `all_gather_object` / `gather_object` on NCCL
pickle into CUDA tensors on `torch.cuda.current_device()`. The trainer therefore initialises the mixed backend
`cpu:gloo,cuda:nccl` for `use_gpu=True` (`torch_backend(use_gpu)`, read by the driver): CUDA tensors (DDP's
gradient buckets, the loss normalisers) take NCCL, CPU tensors and the object collectives take gloo. That makes a
stray CPU tensor legal instead of fatal on the cluster, and keeps multi-megabyte evaluation pickles off the GPU.
On top of that the helpers place their own small tensors on `collective_device()` (the current CUDA device when
the group's CUDA backend is NCCL, else CPU), so the hot per-step agreements run on NCCL on a GPU cluster instead
of a TCP round trip through gloo. CPU runs use plain `gloo`.

Test knob: with `CODETR_RECORD_COLLECTIVES=PATH` in the environment, every tensor handed to a collective here is
recorded as one JSON line {"op", "device", "dtype", "shape", "pid"} in PATH (`tests/test_collectives.py`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.distributed as dist

GPU_BACKEND = "cpu:gloo,cuda:nccl"
CPU_BACKEND = "gloo"


def torch_backend(use_gpu: bool) -> str:
    """The process-group backend string for Ray Train's `TorchConfig(backend=...)` (see the module docstring)."""
    return GPU_BACKEND if use_gpu else CPU_BACKEND


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def device_for_backend(backend: str, cuda_available: bool, current_cuda: int = 0) -> torch.device:
    """Where tensors for a group with `backend` (e.g. "gloo", "nccl", "cpu:gloo,cuda:nccl") must live."""
    names = {item.split(":")[-1].strip() for item in backend.lower().split(",")}
    if "nccl" in names and cuda_available:
        return torch.device("cuda", current_cuda)
    if "nccl" in names:
        raise RuntimeError(f"process-group backend {backend!r} uses NCCL but CUDA is not available")
    return torch.device("cpu")


def collective_device() -> torch.device:
    """The device of the tensors this module hands to the default process group."""
    if not is_distributed():
        return torch.device("cpu")
    cuda = torch.cuda.is_available()
    return device_for_backend(dist.get_backend_config(), cuda, torch.cuda.current_device() if cuda else 0)


def _record(op: str, t: torch.Tensor | None) -> None:
    path = os.environ.get("CODETR_RECORD_COLLECTIVES")
    if not path:
        return
    entry = {"op": op, "pid": os.getpid()}
    if t is not None:
        entry.update(device=str(t.device), dtype=str(t.dtype).replace("torch.", ""), shape=list(t.shape))
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")


def reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of `t` over ranks (all-reduce SUM / world), mmdet's `reduce_mean` for the loss normalisers.

    `t` stays on its device (the model's: CUDA under NCCL); returns a new tensor, `t` itself outside a group."""
    if not is_distributed():
        return t
    out = t.detach().clone()
    _record("all_reduce", out)
    dist.all_reduce(out.div_(dist.get_world_size()), op=dist.ReduceOp.SUM)
    return out


def all_agree(flag: bool | torch.Tensor) -> bool:
    """True iff `flag` is true on every rank: one int32 MIN all-reduce on `collective_device()`.

    Reads the result on the host (one sync): the caller branches on it (stop an epoch, skip a step), and every rank
    must take the same branch or the next collective pairs wrongly."""
    if not is_distributed():
        return bool(flag)
    device = collective_device()
    if isinstance(flag, torch.Tensor):
        t = flag.detach().reshape(1).to(device=device, dtype=torch.int32)
    else:
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    _record("all_reduce", t)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())  # host sync: the branch needs the value


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` in rank order (pickled; gloo under the mixed backend)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    _record("all_gather_object", None)
    dist.all_gather_object(out, obj)
    return out


def gather_objects(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's `obj` on rank `dst` only (rank order); None on the other ranks."""
    if not is_distributed():
        return [obj]
    me = dist.get_rank()
    out: list[Any] | None = [None] * dist.get_world_size() if me == dst else None
    _record("gather_object", None)
    dist.gather_object(obj, out, dst=dst)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` of rank `src` on every rank (the others pass anything, e.g. None)."""
    if not is_distributed():
        return obj
    box = [obj]
    _record("broadcast_object_list", None)
    dist.broadcast_object_list(box, src=src)
    return box[0]
