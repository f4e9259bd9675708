"""Anchor grids with mmdet's `AnchorGenerator` semantics (v2 and v3 agree; `center_offset=0`).

The auxiliary heads of Co-DETR (ATSS, RPN) use mmdet's anchors, whose centres sit at `(x * stride, y * stride)`
(not `(x + 0.5) * stride`), CO_DETR_SPEC.md 2.2 and 9.6. Reproducing the authors' losses needs that convention.

Base anchors (one location, centre 0):
  w = h = base_size (= stride); h_ratio = sqrt(ratio); w_ratio = 1 / h_ratio;
  ws = w * w_ratio[:, None] * scale[None, :] (ratio-major, "scale_major=True"), same for hs;
  anchor = (-0.5 ws, -0.5 hs, 0.5 ws, 0.5 hs). Scales from an octave: octave_base_scale * 2 ** (i / scales_per_octave).
Grid: anchors for location (y, x) are base + (x s, y s, x s, y s); order (y, x, anchor) row-major.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def anchor_scales(
    scales: Sequence[float] | None = None,
    octave_base_scale: float | None = None,
    scales_per_octave: int | None = None,
) -> list[float]:
    """The anchor scales, either given directly or from an octave (mmdet: exactly one of the two ways)."""
    if (scales is None) == (octave_base_scale is None):
        raise ValueError(
            f"give either scales ({scales}) or octave_base_scale ({octave_base_scale}) + scales_per_octave, "
            "exactly one of the two"
        )
    if scales is not None:
        return [float(s) for s in scales]
    if scales_per_octave is None or scales_per_octave < 1:
        raise ValueError(f"scales_per_octave must be >= 1 with octave_base_scale, got {scales_per_octave}")
    return [2 ** (i / scales_per_octave) * octave_base_scale for i in range(scales_per_octave)]


def base_anchors(
    base_size: float, scales: Sequence[float], ratios: Sequence[float], device: torch.device | str | None = None
) -> Tensor:
    """Anchors around centre (0, 0) for one level: (len(ratios) * len(scales), 4) xyxy, ratio-major."""
    scales_t = torch.tensor(list(scales), dtype=torch.float32, device=device)
    ratios_t = torch.tensor(list(ratios), dtype=torch.float32, device=device)
    h_ratios = torch.sqrt(ratios_t)
    w_ratios = 1 / h_ratios
    ws = (base_size * w_ratios[:, None] * scales_t[None, :]).reshape(-1)
    hs = (base_size * h_ratios[:, None] * scales_t[None, :]).reshape(-1)
    return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1)


def level_anchors(
    featmap_size: tuple[int, int], stride: int, base: Tensor, device: torch.device | str | None = None
) -> Tensor:
    """All anchors of one level: (h * w * A, 4) xyxy pixels, order (y, x, anchor)."""
    feat_h, feat_w = int(featmap_size[0]), int(featmap_size[1])
    shift_x = torch.arange(feat_w, device=device, dtype=torch.float32) * stride
    shift_y = torch.arange(feat_h, device=device, dtype=torch.float32) * stride
    yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")  # (h, w) each
    shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4)  # (h*w, 1, 4)
    return (base.to(device)[None] + shifts).reshape(-1, 4)


def grid_anchors(
    featmap_sizes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    scales: Sequence[float] | None = None,
    ratios: Sequence[float] = (1.0,),
    octave_base_scale: float | None = None,
    scales_per_octave: int | None = None,
    device: torch.device | str | None = None,
) -> list[Tensor]:
    """mmdet `AnchorGenerator.grid_priors` with base_size = stride and center_offset = 0.

    Returns one tensor per level, (h_l * w_l * A, 4) xyxy pixels of the network input, A = len(ratios) *
    len(scales), ordered (y, x, anchor) row-major. ATSS: scales=(8,), ratios=(1,); RPN: octave_base_scale=4,
    scales_per_octave=3, ratios=(0.5, 1, 2).
    """
    if len(featmap_sizes) != len(strides):
        raise ValueError(f"got {len(featmap_sizes)} feature map sizes for {len(strides)} strides")
    sc = anchor_scales(scales, octave_base_scale, scales_per_octave)
    return [
        level_anchors(size, stride, base_anchors(stride, sc, ratios, device), device)
        for size, stride in zip(featmap_sizes, strides)
    ]


def valid_flags(
    featmap_sizes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    pad_size: tuple[int, int],
    num_base_anchors: int = 1,
    device: torch.device | str | None = None,
) -> list[Tensor]:
    """mmdet `AnchorGenerator.valid_flags`: per level (h_l * w_l * A,) bool, True where the location lies
    inside ceil(pad_size / stride) (the image's own padded extent, not the batch's)."""
    flags = []
    for (feat_h, feat_w), stride in zip(featmap_sizes, strides):
        valid_h = min(int(math.ceil(pad_size[0] / stride)), int(feat_h))
        valid_w = min(int(math.ceil(pad_size[1] / stride)), int(feat_w))
        vy = torch.zeros(int(feat_h), dtype=torch.bool, device=device)
        vx = torch.zeros(int(feat_w), dtype=torch.bool, device=device)
        vy[:valid_h] = True
        vx[:valid_w] = True
        valid = (vy[:, None] & vx[None, :]).reshape(-1)
        flags.append(valid[:, None].expand(-1, num_base_anchors).reshape(-1))
    return flags


@functools.lru_cache(maxsize=64)
def _memoised(fn: Callable[..., list[Tensor]], *args: object) -> tuple[Tensor, ...]:
    """fn(*args) as a tuple of plain tensors (built outside inference mode so autograd can use them later)."""
    with torch.inference_mode(False), torch.no_grad():
        return tuple(fn(*args))


def _sizes_key(featmap_sizes: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    return tuple((int(h), int(w)) for h, w in featmap_sizes)


def cached_grid_anchors(
    featmap_sizes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    scales: Sequence[float],
    ratios: Sequence[float],
    device: torch.device | str,
) -> list[Tensor]:
    """`grid_anchors` memoised per (sizes, strides, scales, ratios, device) (least recently used 64, shared with
    `cached_valid_flags`): a batch of the same shape reuses the same tensors, so callers must not modify them."""
    return list(_memoised(grid_anchors, _sizes_key(featmap_sizes), tuple(int(s) for s in strides),
                          tuple(float(s) for s in scales), tuple(float(r) for r in ratios), None, None,
                          torch.device(device)))  # fmt: skip


def cached_valid_flags(
    featmap_sizes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    pad_size: tuple[int, int],
    num_base_anchors: int = 1,
    device: torch.device | str | None = None,
) -> list[Tensor]:
    """`valid_flags` memoised like `cached_grid_anchors` (do not modify the tensors)."""
    return list(_memoised(valid_flags, _sizes_key(featmap_sizes), tuple(int(s) for s in strides),
                          (int(pad_size[0]), int(pad_size[1])), int(num_base_anchors),
                          torch.device(device or "cpu")))  # fmt: skip
