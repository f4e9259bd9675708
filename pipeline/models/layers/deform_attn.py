"""Multi-scale deformable attention (Deformable DETR): a readable reference, a PyTorch kernel, a Triton kernel.

- `multi_scale_deformable_attn_reference`: the readable version. One `F.grid_sample` per level
  (bilinear, `align_corners=False`, zero padding, grid = 2 * loc - 1), then a weighted sum over
  levels x points. Used by the tests, the benchmarks and ONNX export.
- `multi_scale_deformable_attn`: the one the model uses. It dispatches (see `deform_attn_impl`) to the Triton
  kernel on CUDA (`deform_attn_triton.py`) and to the PyTorch kernel below elsewhere.
- The PyTorch kernel (`_MSDeformAttnFunction`) writes bilinear sampling as a weighted gather: every (query,
  head, level, point) touches 4 corner pixels; corner row indices and weights (bilinear x attention) are
  computed for all levels at once, and one `F.embedding_bag(mode="sum")` gathers and sums them straight into
  the (B, Q, nH*Dh) output. It saves only its inputs (value, sampling locations, attention weights) for
  backward, like the authors' CUDA kernel, and recomputes the corners there: corner-dot products through
  embedding_bag's per-sample-weight gradient, location / attention-weight gradients in closed form, and the
  value gradient as a sort + segment sum: of the points by their top-left cell when points outnumber value
  rows (the encoder; a quarter of the entries to sort, see `_scatter_by_cell`), else of the corners by row
  (`_scatter_to_rows`). Corners outside their level get weight 0 and never reach a real row of the value
  gradient (no pile-up on the row they were clamped to).

Precision: every kernel computes in float32 (float64 if an input is float64) whatever the input dtypes or
autocast state, and returns the output in value's dtype and each gradient in its input's dtype.
Host syncs: none per call when the caller passes `spatial_hw` (level sizes as Python ints); without it the
sizes are read back from `spatial_shapes` once per call.

`MultiScaleDeformableAttention` is mmcv's module (`mmcv/ops/multi_scale_deform_attn.py`, batch_first=True)
with the same parameter names, init and residual.

Notation: B batch, Q queries, S = sum_l h_l * w_l value tokens, nH heads, Dh = C / nH, L levels, P points,
N = B*Q*nH bags (one per batch, query, head), J = L*P points per bag, R = B*S*nH value rows.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SpatialHW = tuple[tuple[int, int], ...]  # (h, w) per level, Python ints

_INT32_ROWS_LIMIT = 2**31  # corner rows are int32 below this (less memory, faster sort), else int64

IMPLS = ("auto", "pytorch", "triton", "reference")
_IMPL: contextvars.ContextVar[str] = contextvars.ContextVar("deform_attn_impl", default="auto")


@contextlib.contextmanager
def deform_attn_impl(name: str) -> Iterator[None]:
    """Choose the kernel of every `multi_scale_deformable_attn` call inside the `with` block.

    "auto" (default): Triton on CUDA when triton imports, else PyTorch; the grid_sample reference while
    `torch.onnx.is_in_onnx_export()` or `torch.jit.is_tracing()`. "pytorch", "triton": that kernel.
    "reference": the grid_sample version (exportable: plain ATen ops only), e.g. for ONNX export:
        with deform_attn_impl("reference"):
            torch.onnx.export(model, ...)
    """
    if name not in IMPLS:
        raise ValueError(f"deform_attn_impl must be one of {IMPLS}, got {name!r}")
    token = _IMPL.set(name)
    try:
        yield
    finally:
        _IMPL.reset(token)


def level_hw(spatial_shapes: Tensor | Sequence[Sequence[int]]) -> SpatialHW:
    """Level sizes (h, w) as Python ints, from an (L, 2) long tensor (read back once: a host sync on CUDA) or
    from (h, w) pairs already on the host (no sync; SymInts under torch.export stay symbolic)."""
    pairs = spatial_shapes.tolist() if isinstance(spatial_shapes, Tensor) else spatial_shapes
    return tuple((_size(h), _size(w)) for h, w in pairs)


def shapes_tensor(spatial_hw: Sequence[Sequence[Any]], device: torch.device | str) -> Tensor:
    """(h, w) per level -> the (L, 2) long tensor `spatial_shapes`. Under torch.export with a dynamic image size the
    sizes are SymInts, which `torch.as_tensor` would bake in as the example's values: they enter as one * size."""
    if all(isinstance(v, int) for hw in spatial_hw for v in hw):
        return torch.as_tensor(spatial_hw, dtype=torch.long, device=device)
    one = torch.ones((), dtype=torch.long, device=device)
    return torch.stack([torch.stack([one * h, one * w]) for h, w in spatial_hw])


def _size(v: Any) -> int:
    """A level size as an int; a SymInt (torch.export with dynamic image size) stays symbolic: int() of it would
    specialise the exported graph to the example's size."""
    return v if isinstance(v, (int, torch.SymInt)) else int(v)


def _check_inputs(value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor,
                  attention_weights: Tensor, spatial_hw: Sequence[Sequence[int]] | None = None) -> SpatialHW:
    """Validate shapes; returns the level sizes as Python ints (read from `spatial_shapes` if not given)."""
    if value.dim() != 4:
        raise ValueError(f"value must be (B, S, nH, Dh), got shape {tuple(value.shape)}")
    B, S, nH, _ = value.shape
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(f"sampling_locations must be (B, Q, nH, L, P, 2), "
                         f"got {tuple(sampling_locations.shape)}")
    Bq, Q, nHq, L, P, _ = sampling_locations.shape
    if (Bq, nHq) != (B, nH):
        raise ValueError(f"sampling_locations {tuple(sampling_locations.shape)} does not match value "
                         f"{tuple(value.shape)} in batch / heads")
    if tuple(attention_weights.shape) != (B, Q, nH, L, P):
        raise ValueError(f"attention_weights must be {(B, Q, nH, L, P)}, "
                         f"got {tuple(attention_weights.shape)}")
    if tuple(spatial_shapes.shape) != (L, 2):
        raise ValueError(f"spatial_shapes must be ({L}, 2) (h, w) per level, "
                         f"got {tuple(spatial_shapes.shape)}")
    if spatial_hw is None:
        hw = level_hw(spatial_shapes)  # one host sync on CUDA
    else:
        hw = level_hw(spatial_hw)
        if len(hw) != L or any(h < 1 or w < 1 for h, w in hw):
            raise ValueError(f"spatial_hw must be {L} positive (h, w) pairs, got {spatial_hw}")
    total = sum(h * w for h, w in hw)
    if total != S:
        raise ValueError(f"spatial_shapes {[list(p) for p in hw]} cover {total} tokens but value has S={S}")
    return hw


def multi_scale_deformable_attn_reference(value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor,
                                          attention_weights: Tensor,
                                          spatial_hw: Sequence[Sequence[int]] | None = None) -> Tensor:
    """Readable per-level `grid_sample` version (the semantics `multi_scale_deformable_attn` must match).

    Args: as `multi_scale_deformable_attn`.
    Returns: (B, Q, nH*Dh).
    """
    hw = _check_inputs(value, spatial_shapes, sampling_locations, attention_weights, spatial_hw)
    B, S, nH, Dh = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    per_level = value.split([h * w for h, w in hw], dim=1)  # L x (B, h*w, nH, Dh)
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    sampled = []
    for lvl, (h, w) in enumerate(hw):
        v = per_level[lvl].permute(0, 2, 3, 1).reshape(B * nH, Dh, h, w)
        grid = grids[:, :, :, lvl].transpose(1, 2).reshape(B * nH, Q, P, 2)
        sampled.append(F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # (B*nH, Dh, Q, L*P)
    weights = attention_weights.transpose(1, 2).reshape(B * nH, 1, Q, L * P)
    out = (stacked * weights).sum(-1)  # (B*nH, Dh, Q)
    return out.view(B, nH * Dh, Q).transpose(1, 2).contiguous()


# --------------------------------------------------------------------------------------- PyTorch kernel

def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 if any input is float64 (bf16 / fp16 inputs are upcast)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """The kernels pick their own dtypes: autocast off inside them (only device types autocast knows)."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _bag_base(B: int, Q: int, nH: int, per_batch: Tensor | int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(N, 1) b * per_batch + head for bag n = (b, q, head): the offset of a bag's batch item and head in a
    batch-major, head-innermost index (value rows: per_batch = S * nH; cell keys: T * nH)."""
    base = torch.arange(B, device=device).view(B, 1, 1) * per_batch + torch.arange(nH, device=device)
    return base.to(dtype).expand(B, Q, nH).reshape(B * Q * nH, 1)


def _bilinear_corners(spatial_shapes: Tensor, sampling_locations: Tensor, num_values: int, dtype: torch.dtype,
                      derivatives: bool = True, cells: bool = False
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Corner rows and separable bilinear weights of every sampling point, all levels at once.

    A location x in [0, 1] on a level of width w sits at pixel u = x * w - 0.5 (align_corners=False); its
    corners floor(u) and floor(u) + 1 are weighted 1 - frac(u) and frac(u), and count as zero outside.
    Per-level constants are built on the device from `spatial_shapes` (no host sync) and expanded to
    (J, ...) so every elementwise op runs over long contiguous rows.
    Returns:
        rows: (N, 4*J) int32 (int64 if R is near 2**31): corners (y0x0, y0x1, y1x0, y1x1) x J as rows of
            value.reshape(R, Dh). A corner outside its level gets weight 0 and some in-range row.
        wx, wy: (N, 2, J) weights of the (floor, floor + 1) corner along x / y in `dtype`, 0 where outside.
        dwx, dwy: (N, 2, J) their derivatives by the location (pixel derivative (-1, +1) times the level's
            w or h), 0 where outside; None unless `derivatives`.
        cell: (N, J) the point's key in the cell grid `_scatter_by_cell` sums over (None unless `cells`): each
            level padded to (h + 1) x (w + 1) cells, cell (y0 + 1, x0 + 1) for top-left corner (y0, x0); key
            ((b * T + level's first cell + (y0 + 1) * (w + 1) + x0 + 1) * nH + head, T = sum (h + 1)(w + 1).
            Points with no corner inside (y0 or x0 out of [-1, size - 1], all weights 0) get the nearest cell.
    """
    B, Q, nH, L, P, _ = sampling_locations.shape
    N, J, S = B * Q * nH, L * P, num_values
    R = B * S * nH
    device = sampling_locations.device
    idx = torch.int32 if R + 4 * S * nH < _INT32_ROWS_LIMIT else torch.long
    hw = spatial_shapes.to(device=device, dtype=torch.long)
    sizes = hw[:, 0] * hw[:, 1]
    lim = hw.flip(-1).repeat_interleave(P, dim=0).t().contiguous().to(idx)  # (2, J): w, h of each point's level
    level_start = ((sizes.cumsum(0) - sizes) * nH).repeat_interleave(P).to(idx)  # (J,) first row per level
    wh = lim.to(dtype)
    # (N, 2, J) layout (x / y rows): the weights below are written in place as contiguous rows of J.
    pix = torch.mul(sampling_locations.reshape(N, J, 2).transpose(1, 2), wh,
                    out=torch.empty(N, 2, J, dtype=dtype, device=device)).sub_(0.5)
    # Points far outside only need to stay outside (both corners masked, zero derivative): clamp to
    # [-2, w] so the integer row arithmetic below cannot overflow.
    pix = torch.minimum(pix.clamp_(min=-2.0), wh)
    floor = pix.floor()
    frac = pix.sub_(floor)
    lo = floor.to(idx)
    ok_lo = ((lo >= 0) & (lo < lim)).to(dtype)  # (N, 2, J): corner floor(u) inside
    ok_hi = ((lo >= -1) & (lo < lim - 1)).to(dtype)  # corner floor(u) + 1 inside
    weights = frac.new_empty(N, 2, 2, J)  # (N, x / y, floor / floor + 1, J)
    torch.mul(1 - frac, ok_lo, out=weights[:, :, 0])
    torch.mul(frac, ok_hi, out=weights[:, :, 1])
    wx, wy = weights[:, 0], weights[:, 1]  # (N, 2, J)
    dwx = dwy = None
    if derivatives:  # pixel = location * wh - 0.5
        derivs = frac.new_empty(N, 2, 2, J)
        torch.mul(ok_lo, -wh, out=derivs[:, :, 0])
        torch.mul(ok_hi, wh, out=derivs[:, :, 1])
        dwx, dwy = derivs[:, 0], derivs[:, 1]
    del ok_lo, ok_hi, frac, pix, floor
    # Row of (b, token, head) in value.reshape(R, Dh) is (b*S + token)*nH + head, and a level's token is
    # level_start + y*w + x: x steps by nH rows, y by w*nH rows.
    batch_head = _bag_base(B, Q, nH, S * nH, idx, device)
    row_step = lim[0] * nH  # (J,)
    top_left = batch_head + level_start + lo[:, 1] * row_step + lo[:, 0] * nH  # (N, J)
    corner_step = torch.stack([torch.zeros_like(row_step), torch.full_like(row_step, nH), row_step,
                               row_step + nH])  # (4, J)
    rows = (top_left.unsqueeze(1) + corner_step).view(N, 4 * J).clamp_(0, R - 1)  # masked: any valid row
    cell = None
    if cells:
        cell_idx = torch.int32 if 4 * R < _INT32_ROWS_LIMIT else torch.long  # T <= 4 S, so keys < 4 R
        cells_l = (hw + 1).prod(1)  # (L,) cells per level
        total = cells_l.sum()
        cell_start = (cells_l.cumsum(0) - cells_l).repeat_interleave(P).to(cell_idx)  # (J,)
        yx = (torch.minimum(lo, lim - 1).clamp_(min=-1) + 1).to(cell_idx)  # (N, 2, J) in [0, w] x [0, h]
        position = cell_start + yx[:, 1] * (lim[0] + 1).to(cell_idx) + yx[:, 0]  # (N, J) cell in its item
        cell = _bag_base(B, Q, nH, total * nH, cell_idx, device) + position * nH
    return rows, wx, wy, dwx, dwy, cell


def _corner_weights(wx: Tensor, wy: Tensor, attn: Tensor) -> Tensor:
    """wx, wy: (N, 2, J); attn: (N, J) -> (N, 4*J) attn * wy * wx per corner (y0x0, y0x1, y1x0, y1x1)."""
    N, _, J = wx.shape
    return ((wy * attn.unsqueeze(1)).unsqueeze(2) * wx.unsqueeze(1)).reshape(N, 4 * J)


def _group_by_key(keys: Tensor, num_keys: int, per_bag: int,
                  host_sizes: bool | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Sort the entries of (N, per_bag) keys, flattened, by key.

    keys: (N * per_bag,) ints in [0, num_keys). Returns (perm, bag, first): perm (int64) the entries with keys[perm]
    ascending (stable); bag the bag n = entry // per_bag of each sorted entry; first[k] the position in that order
    of key k's first entry (the number of entries with a smaller key), for k in [0, num_keys); bag and first in
    keys' dtype, ready as embedding_bag indices and offsets. `first` comes from `bincount` + cumsum where the device
    can size an output from data without a host round trip (CPU), else from `searchsorted` over the sorted keys
    (bincount reads its output size back to the host on CUDA). host_sizes: force one way (tests run both on CPU).
    """
    if host_sizes is None:
        host_sizes = keys.device.type == "cpu"
    if host_sizes:
        perm = torch.argsort(keys, stable=True)
        counts = torch.bincount(keys, minlength=num_keys)
        first = counts.cumsum(0).sub_(counts)
    else:
        sorted_keys, perm = torch.sort(keys, stable=True)
        first = torch.searchsorted(sorted_keys, torch.arange(num_keys, device=keys.device, dtype=keys.dtype))
    bag = perm.div(per_bag, rounding_mode="floor").to(keys.dtype)
    return perm, bag, first.to(keys.dtype)


def _corner_order(rows: Tensor, weights: Tensor, num_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """The corner entries grouped by value row, for `_scatter_to_rows` and `_corner_dots`.

    rows, weights: (N, K). Zero-weight entries (corners outside their level, which all share some clamped row)
    are filed under a dummy row num_rows, so no real row collects them.
    Returns (perm, bag, offsets): perm (N*K,) the entries in row order, bag (N*K,) the bag n of each of them,
    offsets (num_rows + 1,) the first position of every row in that order; bag and offsets in rows' dtype.
    """
    return _group_by_key(rows.masked_fill(weights == 0, num_rows).view(-1), num_rows + 1, rows.shape[1])


def _scatter_to_rows(order: tuple[Tensor, Tensor, Tensor], weights: Tensor, grad_out: Tensor,
                     num_rows: int) -> Tensor:
    """Transpose of the weighted gather: grad_table[r] = sum of w[n, k] * grad_out[n] over rows[n, k] == r.

    order: `_corner_order(rows, weights, num_rows)`; weights: (N, K); grad_out: (N, Dh) -> (num_rows, Dh). One
    embedding_bag sums each row's entries (rows never touched get an empty bag, i.e. zero); the dummy row of
    the zero-weight entries is dropped.
    """
    perm, bag, offsets = order
    per_entry = weights.reshape(-1).index_select(0, perm)
    out = F.embedding_bag(bag, grad_out, offsets, per_sample_weights=per_entry, mode="sum")
    return out[:num_rows]


def _scatter_by_cell(cell: Tensor, corner_w: Tensor, grad_out: Tensor, hw: SpatialHW, batch: int,
                     heads: int) -> Tensor:
    """Transpose of the weighted gather, for many points per value row (the encoder: N*J = 20 R).

    grad_value[r] = sum of w[n, k] * grad_out[n] over the corners k of bag n that fall on row r. The four corners
    of a point share its cell (`_bilinear_corners`), so the N*J points are sorted by cell (a quarter of the
    4*N*J corner entries `_scatter_to_rows` sorts). Cells are laid out like value rows, with each level padded
    by one row and column, so corner (dy, dx) maps cells to rows monotonically: row (y, x) takes cell
    (y + 1 - dy, x + 1 - dx). Per corner, one embedding_bag whose bag r spans the sorted points from that
    cell's first point to the next row's cell gives the row sums straight in value's layout; the points it
    spans beyond the cell lie in padding cells, whose corner (dy, dx) is outside the level, so their weight for
    this corner is 0 (as is that of a point whose location was far outside, filed under the nearest cell).
    Sizes come from `hw` (Python ints): no host read on any device.
    Args:
        cell: (N, J) cell keys; corner_w: (N, 4*J) as (y0x0, y0x1, y1x0, y1x1) x J; grad_out: (N, Dh).
    Returns:
        (B, S, nH, Dh) gradient of value, in grad_out's dtype.
    """
    N, J = cell.shape
    Dh = grad_out.shape[1]
    cells_l = [(h + 1) * (w + 1) for h, w in hw]
    total = sum(cells_l)
    perm, bags, first = _group_by_key(cell.view(-1), batch * total * heads, J)
    first = first.view(batch, total, heads)  # first sorted point of every cell
    per_corner = corner_w.view(N, 4, J)
    grad = None
    for corner, (dy, dx) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        starts, cell_start = [], 0
        for (h, w), n_cells in zip(hw, cells_l):
            level = first[:, cell_start:cell_start + n_cells].view(batch, h + 1, w + 1, heads)
            starts.append(level[:, 1 - dy:h + 1 - dy, 1 - dx:w + 1 - dx].reshape(batch, h * w, heads))
            cell_start += n_cells
        offsets = torch.cat(starts, 1).view(-1)
        offsets[:1] = 0  # bag 0 from the first point: the ones before it lie in padding cells
        weights = per_corner[:, corner].reshape(-1).index_select(0, perm)
        sums = F.embedding_bag(bags, grad_out, offsets, per_sample_weights=weights, mode="sum")
        grad = sums if grad is None else grad.add_(sums)
    assert grad is not None
    return grad.view(batch, -1, heads, Dh)


def _corner_dots(table: Tensor, rows: Tensor, weights: Tensor, grad_out: Tensor,
                 order: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """dots[n, k] = <grad_out[n], table[rows[n, k]]>, i.e. d(sum_k w[n,k] table[rows[n,k]]) / d w[n, k].

    This is embedding_bag's per-sample-weight gradient, which computes it without materialising the (N, K, Dh)
    gather. ATen exposes it only as `aten._embedding_bag_per_sample_weights_backward` (no public function):
    calling it directly skips the embedding_bag forward that going through autograd would recompute (a full
    gather), and lets the entries come in any order, since each names its bag. Given `order` (from
    `_corner_order`), they are visited in row order: the table is then read front to back instead of at
    random, which is what this costs when the table is larger than the cache. If a torch build lacks the op,
    autograd does it. table: (R, Dh); rows, weights: (N, K) -> (N, K).
    """
    N, K = rows.shape
    op = getattr(torch.ops.aten, "_embedding_bag_per_sample_weights_backward", None)
    if op is not None:
        offsets = torch.arange(0, N * K, K, device=rows.device, dtype=rows.dtype)
        if order is None:
            bag = torch.arange(N, device=rows.device, dtype=rows.dtype).repeat_interleave(K)
            return op(grad_out, table, rows.reshape(-1), offsets, bag, 0).view(N, K)
        perm, bag, _ = order
        dots = op(grad_out, table, rows.reshape(-1).index_select(0, perm), offsets, bag, 0)
        return torch.empty_like(dots).index_copy_(0, perm, dots).view(N, K)
    with torch.enable_grad():
        w = weights.detach().requires_grad_()
        out = F.embedding_bag(rows, table.detach(), per_sample_weights=w, mode="sum")
        (dots,) = torch.autograd.grad(out, w, grad_out)
    return dots


class _MSDeformAttnFunction(torch.autograd.Function):
    """Gather kernel; saves only its inputs and recomputes the corners in backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor,
        hw: SpatialHW
    ) -> Tensor:
        B, S, nH, Dh = value.shape
        _, Q, _, L, P, _ = sampling_locations.shape
        N, J = B * Q * nH, L * P
        dtype = _compute_dtype(value, sampling_locations, attention_weights)
        with _autocast_off(value.device):
            rows, wx, wy, _, _, _ = _bilinear_corners(spatial_shapes, sampling_locations, S, dtype,
                                                      derivatives=False)
            corner_w = _corner_weights(wx, wy, attention_weights.reshape(N, J).to(dtype))
            del wx, wy
            table = value.reshape(B * S * nH, Dh).to(dtype)
            out = F.embedding_bag(rows, table, per_sample_weights=corner_w, mode="sum")
        ctx.save_for_backward(value, spatial_shapes, sampling_locations, attention_weights)
        ctx.hw = hw
        return out.view(B, Q, nH * Dh).to(value.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx, grad_out: Tensor
    ) -> tuple[Tensor | None, None, Tensor | None, Tensor | None, None]:
        value, spatial_shapes, sampling_locations, attention_weights = ctx.saved_tensors
        need_value, _, need_loc, need_attn, _ = ctx.needs_input_grad
        B, S, nH, Dh = value.shape
        _, Q, _, L, P, _ = sampling_locations.shape
        N, J, R = B * Q * nH, L * P, B * S * nH
        dtype = _compute_dtype(value, sampling_locations, attention_weights)
        grad_value = grad_loc = grad_attn = None
        with _autocast_off(value.device):
            grad_out = grad_out.reshape(N, Dh).to(dtype)
            by_cell = need_value and N * J >= R  # encoder-like: points outnumber value rows
            rows, wx, wy, dwx, dwy, cell = _bilinear_corners(spatial_shapes, sampling_locations, S, dtype,
                                                             cells=by_cell)
            assert dwx is not None and dwy is not None
            attn = attention_weights.reshape(N, J).to(dtype)
            corner_w = _corner_weights(wx, wy, attn)
            order = _corner_order(rows, corner_w, R) if need_value and cell is None else None
            if need_loc or need_attn:
                # dots[n, i, j, p] = <grad_out[n], value at corner (y_i, x_j) of point p>. Corners outside
                # the level drop out because their weights and weight derivatives are 0.
                table = value.reshape(R, Dh).to(dtype)
                dots = _corner_dots(table, rows, corner_w, grad_out, order).view(N, 2, 2, J)
                del table
                dots_y = (dots * wx.unsqueeze(1)).sum(2)  # (N, 2y, J): bilinear in x done
                if need_attn:
                    grad_attn = (dots_y * wy).sum(1).view(attention_weights.shape).to(attention_weights.dtype)
                if need_loc:
                    grad_y = (dots_y * dwy).sum(1)  # d out / d location y, without the attention weight
                    grad_x = ((dots * wy.unsqueeze(2)).sum(1) * dwx).sum(1)
                    grad_loc = torch.stack([grad_x, grad_y], -1) * attn.unsqueeze(-1)
                    grad_loc = grad_loc.view(sampling_locations.shape).to(sampling_locations.dtype)
                del dots, dots_y
            del wx, wy, dwx, dwy, rows
            if need_value:
                if cell is not None:
                    grad_value = _scatter_by_cell(cell, corner_w, grad_out, ctx.hw, B, nH)
                else:
                    assert order is not None
                    grad_value = _scatter_to_rows(order, corner_w, grad_out, R).view(B, S, nH, Dh)
                grad_value = grad_value.to(value.dtype)
        return grad_value, None, grad_loc, grad_attn, None


@functools.cache
def _triton_available() -> bool:
    """Whether the Triton kernel imports (triton installed and usable)."""
    try:
        import pipeline.models.layers.deform_attn_triton  # noqa: F401
    except Exception:  # ImportError, or a triton that fails to initialise: fall back to PyTorch
        return False
    return True


def _pick_impl(value: Tensor, impl: str | None) -> str:
    name = _IMPL.get() if impl is None else impl
    if name not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {name!r}")
    if name != "auto":
        return name
    if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
        return "reference"
    if value.is_cuda and _triton_available():
        return "triton"
    return "pytorch"


def multi_scale_deformable_attn(value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor,
                                attention_weights: Tensor, spatial_hw: Sequence[Sequence[int]] | None = None,
                                impl: str | None = None) -> Tensor:
    """Multi-scale deformable attention core (no projections).

    Numerically equal to `multi_scale_deformable_attn_reference` (per-level `grid_sample`, bilinear,
    align_corners=False, zero padding): points outside a level sample zeros there. Computes in float32
    (float64 for float64 inputs) and returns value's dtype; saves only its inputs for backward.

    Args:
        value: (B, S, nH, Dh), levels concatenated along S in `spatial_shapes` order, row-major per level.
        spatial_shapes: (L, 2) long, (h, w) per level, on value's device; sum of h*w must equal S.
        sampling_locations: (B, Q, nH, L, P, 2) as (x, y), normalised so [0, 1] spans each level; any value
            is allowed (outside -> zeros).
        attention_weights: (B, Q, nH, L, P), usually softmax-normalised over (L, P).
        spatial_hw: the same (h, w) per level as Python ints (must agree with `spatial_shapes`); saves the
            host sync that reading `spatial_shapes` back costs on CUDA.
        impl: "pytorch", "triton", "reference" or "auto"; None = the `deform_attn_impl` context (default
            "auto": Triton on CUDA, else PyTorch).
    Returns:
        (B, Q, nH*Dh), heads concatenated, in value's dtype.
    """
    hw = _check_inputs(value, spatial_shapes, sampling_locations, attention_weights, spatial_hw)
    name = _pick_impl(value, impl)
    if name == "reference":
        return multi_scale_deformable_attn_reference(value, spatial_shapes, sampling_locations,
                                                     attention_weights, hw)
    if name == "triton":
        from pipeline.models.layers.deform_attn_triton import multi_scale_deformable_attn_triton

        return multi_scale_deformable_attn_triton(value, spatial_shapes, sampling_locations, attention_weights)
    return _MSDeformAttnFunction.apply(value, spatial_shapes, sampling_locations, attention_weights, hw)


class MultiScaleDeformableAttention(nn.Module):
    """mmcv `MultiScaleDeformableAttention` (batch_first=True): projections, softmax, residual.

    Args:
        embed_dims: C. num_heads: nH (C % nH == 0). num_levels: L. num_points: P per head and level.
        dropout: on the projected output, before the residual add.
    """

    def __init__(self, embed_dims: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if embed_dims % num_heads != 0:
            raise ValueError(f"embed_dims={embed_dims} must be divisible by num_heads={num_heads}")
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        self.dropout = nn.Dropout(dropout)
        self.init_weights()

    def init_weights(self) -> None:
        """mmcv init: zero offsets with a radial-grid bias, zero attention logits, Xavier projections."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)  # (nH, 2) unit directions
        grid = grid / grid.abs().max(-1, keepdim=True)[0]  # push onto the square's border
        grid = grid.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        scale = torch.arange(1, self.num_points + 1, dtype=torch.float32)  # point i reaches i + 1
        grid = grid * scale.view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def project_value(self, value: Tensor, value_padding_mask: Tensor | None = None) -> Tensor:
        """value (B, S, C) -> value_proj(value) with the padding tokens zeroed, (B, S, C)."""
        v = self.value_proj(value)
        if value_padding_mask is not None:
            v = v.masked_fill(value_padding_mask[..., None], 0.0)
        return v

    def forward(self, query: Tensor, reference_points: Tensor, value: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor | None = None, value_padding_mask: Tensor | None = None,
                query_pos: Tensor | None = None, identity: Tensor | None = None,
                spatial_hw: Sequence[Sequence[int]] | None = None, projected_value: Tensor | None = None) -> Tensor:
        """Deformable attention from queries into the multi-level value map.

        Args:
            query: (B, Q, C). reference_points: (B, Q, L, 2) as (x, y) or (B, Q, L, 4) as (cx, cy, w, h),
                normalised per level (already multiplied by valid ratios), padding area included.
            value: (B, S, C). spatial_shapes: (L, 2) long (h, w). level_start_index: (L,), unused (implied by
                spatial_shapes), kept for the shared signature.
            value_padding_mask: (B, S) bool, True = padding; those value tokens are zeroed.
            query_pos: (B, Q, C) added to the query for the offset / weight projections only.
            identity: (B, Q, C) residual; defaults to `query` (without query_pos).
            spatial_hw: `spatial_shapes` as Python ints ((h, w) per level), if the caller has them: no host
                sync in the kernel then.
            projected_value: `project_value(value, value_padding_mask)` computed earlier, (B, S, C): skips the
                value projection (a second decoder pass over the same memory reuses the first pass's).
        Returns:
            (B, Q, C) = dropout(output_proj(attention)) + identity.
        """
        if identity is None:
            identity = query
        if query_pos is not None:
            query = query + query_pos
        B, Q, _ = query.shape
        S = value.shape[1]
        nH, L, P = self.num_heads, self.num_levels, self.num_points
        if spatial_shapes.shape[0] != L:
            raise ValueError(f"spatial_shapes has {spatial_shapes.shape[0]} levels, "
                             f"module expects num_levels={L}")
        v = self.project_value(value, value_padding_mask) if projected_value is None else projected_value
        v = v.view(B, S, nH, -1)
        offsets = self.sampling_offsets(query).view(B, Q, nH, L, P, 2)
        weights = self.attention_weights(query).view(B, Q, nH, L * P).softmax(-1).view(B, Q, nH, L, P)
        if reference_points.shape[-1] == 2:
            normalizer = spatial_shapes.flip(-1).to(offsets)  # (L, 2) as (w, h)
            locations = (reference_points[:, :, None, :, None, :]
                         + offsets / normalizer[None, None, None, :, None, :])
        elif reference_points.shape[-1] == 4:
            ref_xy = reference_points[:, :, None, :, None, :2]
            ref_wh = reference_points[:, :, None, :, None, 2:]
            locations = ref_xy + offsets / P * ref_wh * 0.5
        else:
            raise ValueError(f"reference_points last dim must be 2 or 4, "
                             f"got shape {tuple(reference_points.shape)}")
        out = multi_scale_deformable_attn(v, spatial_shapes, locations, weights, spatial_hw)
        return self.dropout(self.output_proj(out)) + identity
