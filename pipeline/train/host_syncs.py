"""Count device->host synchronisations of a code region on any device, the CPU included (a test/bench tool).

    with HostSyncCounter() as syncs:
        losses = model(images, masks, targets)
        sum(losses.values()).backward()
    syncs.total                    # calls that would block the host on a GPU
    syncs.by_site()                # {("pipeline/models/x.py:12", "item"): 3, ...}

While the context is open the Tensor methods and torch functions below are wrapped (class attributes patched,
restored on exit); each call is counted under the innermost caller frame inside `pipeline/` (else the innermost
frame outside torch, marked "<outside>"). On a GPU every counted call waits for the device:

- value reads: Tensor.item, .tolist, .cpu, .numpy (not counted on the result of a counted .cpu()),
  int() / float() / bool() / operator.index() of a tensor (Tensor.__int__ / __float__ / __bool__ / __index__),
  torch.equal / torch.allclose (they return a Python bool);
- data-dependent shapes: torch.nonzero / Tensor.nonzero / argwhere, single-argument torch.where,
  masked_select, unique, bincount, repeat_interleave with tensor repeats and no output_size, and indexing
  with a bool mask (`x[mask]`; `x[mask] = t` with a tensor value of more than one element; `x[mask] = 0.0`
  is a masked_fill and does not sync).

Limits: on the CPU every tensor lives on the host, so a call on a tensor that would be a host tensor on a GPU
(a `.cpu()` result used further with torch ops, targets still on the host) is counted too: keep host-side
work in numpy. Syncs inside C++ (e.g. `torch.tensor([t0, t1])` of 0-dim tensors, `.to("cpu")`) are not
seen. The GPU-side check is `torch.cuda.set_sync_debug_mode("warn")` (bench/host_syncs.py --device cuda).
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import torch

__all__ = ["HostSyncCounter"]

_PIPELINE = str(Path(__file__).resolve().parents[1]) + "/"  # .../pipeline/
_ROOT = str(Path(__file__).resolve().parents[2]) + "/"
_SKIP = (str(Path(torch.__file__).parent), __file__)

_VALUE_METHODS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")
_SHAPE_METHODS = ("nonzero", "argwhere", "masked_select", "unique", "bincount")
_TORCH_FUNCS = ("nonzero", "argwhere", "masked_select", "unique", "bincount", "equal", "allclose")


def _is_bool_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype == torch.bool


def _has_bool_mask(index: Any) -> bool:
    if isinstance(index, tuple):
        return any(_is_bool_tensor(i) for i in index)
    return _is_bool_tensor(index)


class HostSyncCounter:
    """Context manager counting would-be host syncs per call site (see the module docstring). Not reentrant."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        self._saved: list[tuple[Any, str, Any]] = []
        self._host: dict[int, weakref.ref] = {}  # id -> results of counted .cpu() calls
        self._depth = threading.local()

    # --------------------------------------------------------------------------------------------------
    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def by_site(self) -> dict[tuple[str, str], int]:
        """{(site "path:line", kind): count}, most frequent first."""
        return dict(self.counts.most_common())

    def total_under(self, *prefixes: str) -> int:
        """Calls counted at sites whose path starts with one of `prefixes` (e.g. "pipeline/models/losses.py")."""
        return sum(n for (site, _), n in self.counts.items() if site.startswith(prefixes))

    def table(self) -> str:
        """One line per (site, kind), then the total."""
        lines = [f"{n:6d}  {kind:<22s} {site}" for (site, kind), n in self.counts.most_common()]
        return "\n".join(lines + [f"{self.total:6d}  total"])

    # --------------------------------------------------------------------------------------------------
    def _site(self) -> str:
        frame: FrameType | None = sys._getframe(2)
        outside = None
        while frame is not None:
            name = frame.f_code.co_filename
            if name.startswith(_PIPELINE) and name != __file__:
                return f"{name[len(_ROOT) :]}:{frame.f_lineno}"
            if outside is None and not name.startswith(_SKIP):
                outside = f"<outside> {name}:{frame.f_lineno}"
            frame = frame.f_back
        return outside or "<unknown>"

    def _count(self, kind: str) -> None:
        site = self._site()
        with self._lock:
            self.counts[(site, kind)] += 1

    def _busy(self) -> bool:
        return getattr(self._depth, "n", 0) > 0

    def _wrap(self, kind: str, fn: Callable, when: Callable[..., bool] | None = None) -> Callable:
        counter = self

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if counter._busy():  # a wrapped call made by another wrapped call: count the outer one only
                return fn(*args, **kwargs)
            if when is None or when(*args, **kwargs):
                counter._count(kind)
            counter._depth.n = 1
            try:
                return fn(*args, **kwargs)
            finally:
                counter._depth.n = 0

        wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
        return wrapper

    def _patch(self, owner: Any, name: str, kind: str, when: Callable[..., bool] | None = None) -> None:
        original = getattr(owner, name)
        self._saved.append((owner, name, owner.__dict__.get(name, _MISSING)))
        setattr(owner, name, self._wrap(kind, original, when))

    def __enter__(self) -> HostSyncCounter:
        if self._saved:
            raise RuntimeError("HostSyncCounter is not reentrant")
        T = torch.Tensor
        for name in _VALUE_METHODS:
            self._patch(T, name, name.strip("_"))
        for name in _SHAPE_METHODS:
            self._patch(T, name, name)
        for name in _TORCH_FUNCS:
            self._patch(torch, name, name)
        self._patch(torch, "where", "where(cond)", lambda *a, **k: len(a) + len(k) == 1)
        self._patch(T, "repeat_interleave", "repeat_interleave",
                    lambda self_, repeats=None, *a, **k: isinstance(repeats, torch.Tensor) and repeats.numel() > 1
                    and k.get("output_size") is None)  # fmt: skip
        self._patch(T, "__getitem__", "getitem[bool mask]", lambda self_, index: _has_bool_mask(index))
        self._patch(T, "__setitem__", "setitem[bool mask]",
                    lambda self_, index, value: _has_bool_mask(index) and isinstance(value, torch.Tensor)
                    and value.numel() > 1)  # fmt: skip
        host = self._host
        cpu, numpy = T.cpu, T.numpy

        def counted_cpu(t: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            out = cpu(t, *args, **kwargs)
            host[id(out)] = weakref.ref(out)
            return out

        def on_device(t: torch.Tensor, *args: Any, **kwargs: Any) -> bool:
            ref = host.get(id(t))
            return ref is None or ref() is not t

        self._saved.append((T, "cpu", T.__dict__.get("cpu", _MISSING)))
        T.cpu = self._wrap("cpu", counted_cpu)  # type: ignore[method-assign]
        self._saved.append((T, "numpy", T.__dict__.get("numpy", _MISSING)))
        T.numpy = self._wrap("numpy", numpy, on_device)  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, original in reversed(self._saved):
            if original is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        self._saved.clear()
        self._host.clear()


_MISSING = object()
