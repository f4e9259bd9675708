"""Multi-scale deformable attention (Deformable DETR), pure PyTorch.

Two kernels with the same signature and the same numbers:

- `multi_scale_deformable_attn_reference`: the readable version. One `F.grid_sample` per level
  (bilinear, `align_corners=False`, zero padding, grid = 2 * loc - 1), then a weighted sum over
  levels x points. Kept for tests and benchmarks.
- `multi_scale_deformable_attn`: the one the model uses. Bilinear sampling is written as a weighted
  gather: every (query, head, level, point) touches 4 corner pixels; all corner row indices and weights
  (bilinear weight x attention weight, 0 for corners outside the map) are computed for all levels at
  once, and one `F.embedding_bag(mode="sum")` gathers and sums them straight into the (B, Q, nH*Dh)
  output, without materialising the (B*nH, Dh, Q, L*P) sampled tensor. The backward is written out by
  hand (`_MSDeformAttnFunction`): value gradient as a sort + segment sum, corner-dot products through
  embedding_bag's per-sample-weight gradient, location / attention-weight gradients in closed form.
  Same function on CPU and CUDA. bench/deform_attn.py measures it against the reference.

`MultiScaleDeformableAttention` is mmcv's module (`mmcv/ops/multi_scale_deform_attn.py`, batch_first=True)
with the same parameter names, init and residual.

Notation: B batch, Q queries, S = sum_l h_l * w_l value tokens, nH heads, Dh = C / nH, L levels, P points.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_INT32_ROWS_LIMIT = 2**31  # corner rows are int32 below this (less memory, faster sort), else int64


def _check_inputs(value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor,
                  attention_weights: Tensor) -> None:
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
    total = int(spatial_shapes.prod(1).sum())
    if total != S:
        raise ValueError(f"spatial_shapes {spatial_shapes.tolist()} cover {total} tokens but value has S={S}")


def multi_scale_deformable_attn_reference(value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor,
                                          attention_weights: Tensor) -> Tensor:
    """Readable per-level `grid_sample` version (the semantics `multi_scale_deformable_attn` must match).

    Args: as `multi_scale_deformable_attn`.
    Returns: (B, Q, nH*Dh).
    """
    _check_inputs(value, spatial_shapes, sampling_locations, attention_weights)
    B, S, nH, Dh = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    hw = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
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


def _level_wh(spatial_shapes: Tensor, num_points: int, device: torch.device) -> Tensor:
    """(L*P, 2) long (w, h) of the level of each of the L*P sampling points of a bag."""
    return spatial_shapes.to(device=device, dtype=torch.long).flip(-1).repeat_interleave(num_points, dim=0)


def _bilinear_corners(spatial_shapes: Tensor, sampling_locations: Tensor, num_values: int
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Corner rows and separable bilinear weights of every sampling point, all levels at once.

    A location x in [0, 1] on a level of width w sits at pixel u = x * w - 0.5 (align_corners=False); its
    corners floor(u) and floor(u) + 1 are weighted 1 - frac(u) and frac(u), and count as zero outside.
    N = B*Q*nH bags (one per batch, query, head), J = L*P points per bag. Per-level constants are
    expanded to (J, ...) so every elementwise op runs over long contiguous rows.
    Returns:
        rows: (N, 4, J) int32 (int64 if B*S*nH is near 2**31): corners (y0x0, y0x1, y1x0, y1x1) as rows of
            value.reshape(B*S*nH, Dh). A corner outside its level gets weight 0 and some in-range row.
        wx, wy: (N, 2, J) weights of the (floor, floor + 1) corner along x / y, 0 where outside.
        dwx, dwy: (N, 2, J) their derivatives by the pixel coordinate, (-1, +1), 0 where outside.
    """
    B, Q, nH, L, P, _ = sampling_locations.shape
    N, J, S = B * Q * nH, L * P, num_values
    device, dtype = sampling_locations.device, sampling_locations.dtype
    num_rows = B * S * nH
    idx = torch.int32 if num_rows + 4 * S * nH < _INT32_ROWS_LIMIT else torch.long
    wh = _level_wh(spatial_shapes, P, device)  # (J, 2)
    pix = sampling_locations.reshape(N, J, 2) * wh.to(dtype) - 0.5
    # Points far outside only need to stay outside (both corners masked, zero derivative): clamp to
    # [-2, w] so the integer row arithmetic below cannot overflow.
    pix = torch.minimum(pix.clamp_(min=-2.0), wh.to(dtype))
    floor = pix.floor()
    frac = pix - floor
    lo = floor.to(idx)
    lim = wh.to(idx)
    valid_lo = ((lo >= 0) & (lo < lim)).to(dtype)  # (N, J, 2)
    valid_hi = ((lo >= -1) & (lo < lim - 1)).to(dtype)
    w_lo, w_hi = (1 - frac) * valid_lo, frac * valid_hi
    wx = torch.stack([w_lo[..., 0], w_hi[..., 0]], 1)  # (N, 2, J)
    wy = torch.stack([w_lo[..., 1], w_hi[..., 1]], 1)
    dwx = torch.stack([-valid_lo[..., 0], valid_hi[..., 0]], 1)
    dwy = torch.stack([-valid_lo[..., 1], valid_hi[..., 1]], 1)
    # Row of (b, token, head) in value.reshape(B*S*nH, Dh) is (b*S + token)*nH + head, and a level's token
    # is level_start + y*w + x: x steps by nH rows, y by w*nH rows.
    hw = spatial_shapes.to(device=device, dtype=torch.long)
    sizes = hw[:, 0] * hw[:, 1]
    level_start = ((sizes.cumsum(0) - sizes) * nH).repeat_interleave(P).to(idx)  # (J,)
    batch_head = torch.arange(B, device=device).view(B, 1, 1) * (S * nH) + torch.arange(nH, device=device)
    batch_head = batch_head.to(idx).expand(B, Q, nH).reshape(N, 1)
    row_step = wh[:, 0].to(idx) * nH  # (J,)
    top_left = batch_head + level_start + lo[..., 1] * row_step + lo[..., 0] * nH  # (N, J)
    corner_step = torch.stack([torch.zeros_like(row_step), torch.full_like(row_step, nH), row_step,
                               row_step + nH])  # (4, J)
    rows = (top_left.unsqueeze(1) + corner_step).clamp_(0, num_rows - 1)  # masked corners: any valid row
    return rows, wx, wy, dwx, dwy


def _scatter_to_rows(rows: Tensor, weights: Tensor, grad_out: Tensor, num_rows: int) -> Tensor:
    """Transpose of the weighted gather: grad_table[r] = sum of w[n, k] * grad_out[n] over rows[n, k] == r.

    rows, weights: (N, K); grad_out: (N, Dh) -> (num_rows, Dh). Entries are grouped by row with one sort,
    then summed per row by one embedding_bag (rows never touched get an empty bag, i.e. zero).
    """
    K = rows.shape[1]
    flat = rows.reshape(-1)
    perm = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_rows)
    offsets = counts.cumsum(0) - counts
    per_entry = weights.reshape(-1).index_select(0, perm)
    bags = perm.div_(K, rounding_mode="floor")  # entry -> the output row it came from
    return F.embedding_bag(bags, grad_out, offsets, per_sample_weights=per_entry, mode="sum")


def _corner_dots(table: Tensor, rows: Tensor, weights: Tensor, grad_out: Tensor) -> Tensor:
    """dots[n, k] = <grad_out[n], table[rows[n, k]]>, i.e. d(sum_k w[n,k] table[rows[n,k]]) / d w[n, k].

    embedding_bag's own per-sample-weight backward computes exactly this without materialising the
    (N, K, Dh) gather, so it is called through autograd. table: (R, Dh); rows, weights: (N, K) -> (N, K).
    """
    with torch.enable_grad():
        w = weights.detach().requires_grad_()
        out = F.embedding_bag(rows, table.detach(), per_sample_weights=w, mode="sum")
        (dots,) = torch.autograd.grad(out, w, grad_out)
    return dots


class _MSDeformAttnFunction(torch.autograd.Function):
    """Gather kernel with closed-form gradients for sampling locations and attention weights."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor
    ) -> Tensor:
        B, S, nH, Dh = value.shape
        _, Q, _, L, P, _ = sampling_locations.shape
        N, J = B * Q * nH, L * P  # one bag of 4 x J corners per (batch, query, head)
        rows, wx, wy, dwx, dwy = _bilinear_corners(spatial_shapes, sampling_locations, S)
        attn = attention_weights.reshape(N, 1, J).to(wx.dtype)
        corner_w = ((wy * attn).unsqueeze(2) * wx.unsqueeze(1)).view(N, 4 * J)  # (N, 2y, 2x, J) flattened
        rows = rows.view(N, 4 * J)
        corner_w = corner_w.to(value.dtype)
        out = F.embedding_bag(rows, value.view(B * S * nH, Dh), per_sample_weights=corner_w, mode="sum")
        ctx.save_for_backward(value, spatial_shapes, rows, corner_w, wx, wy, dwx, dwy, attn)
        ctx.loc_shape_dtype = (sampling_locations.shape, sampling_locations.dtype)
        ctx.attn_shape_dtype = (attention_weights.shape, attention_weights.dtype)
        return out.view(B, Q, nH * Dh)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx, grad_out: Tensor
    ) -> tuple[Tensor | None, None, Tensor | None, Tensor | None]:
        value, spatial_shapes, rows, corner_w, wx, wy, dwx, dwy, attn = ctx.saved_tensors
        B, S, nH, Dh = value.shape
        N, _, J = wx.shape
        grad_out = grad_out.reshape(N, Dh)
        table = value.view(B * S * nH, Dh)
        need_value, _, need_loc, need_attn = ctx.needs_input_grad
        grad_value = grad_loc = grad_attn = None
        if need_value:
            grad_value = _scatter_to_rows(rows, corner_w, grad_out, table.shape[0]).view(B, S, nH, Dh)
        if need_loc or need_attn:
            # dots[n, i, j, p] = <grad_out[n], value at corner (y_i, x_j) of point p>. Corners outside the
            # level drop out because their weights and weight derivatives are 0.
            dots = _corner_dots(table, rows, corner_w, grad_out).view(N, 2, 2, J).to(wx.dtype)
            dots_y = (dots * wx.unsqueeze(1)).sum(2)  # (N, 2y, J): bilinear in x done
            if need_attn:
                shape, dtype = ctx.attn_shape_dtype
                grad_attn = (dots_y * wy).sum(1).view(shape).to(dtype)
            if need_loc:
                shape, dtype = ctx.loc_shape_dtype
                grad_y = (dots_y * dwy).sum(1)  # d out / d pixel y, without the attention weight
                grad_x = ((dots * wy.unsqueeze(2)).sum(1) * dwx).sum(1)
                wh = _level_wh(spatial_shapes, shape[4], wx.device).to(wx.dtype)  # pixel = loc * wh - 0.5
                grad_loc = torch.stack([grad_x, grad_y], -1) * attn.view(N, J, 1) * wh
                grad_loc = grad_loc.view(shape).to(dtype)
        return grad_value, None, grad_loc, grad_attn


def multi_scale_deformable_attn(value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor,
                                attention_weights: Tensor) -> Tensor:
    """Multi-scale deformable attention core (no projections), fast pure-PyTorch gather kernel.

    Numerically equal to `multi_scale_deformable_attn_reference` (per-level `grid_sample`, bilinear,
    align_corners=False, zero padding): points outside a level sample zeros there.

    Args:
        value: (B, S, nH, Dh), levels concatenated along S in `spatial_shapes` order, row-major per level.
        spatial_shapes: (L, 2) long, (h, w) per level; sum of h*w must equal S.
        sampling_locations: (B, Q, nH, L, P, 2) as (x, y), normalised so [0, 1] spans each level; any value
            is allowed (outside -> zeros).
        attention_weights: (B, Q, nH, L, P), usually softmax-normalised over (L, P).
    Returns:
        (B, Q, nH*Dh), heads concatenated.
    """
    _check_inputs(value, spatial_shapes, sampling_locations, attention_weights)
    return _MSDeformAttnFunction.apply(value.contiguous(), spatial_shapes, sampling_locations,
                                       attention_weights)


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

    def forward(self, query: Tensor, reference_points: Tensor, value: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor | None = None, value_padding_mask: Tensor | None = None,
                query_pos: Tensor | None = None, identity: Tensor | None = None) -> Tensor:
        """Deformable attention from queries into the multi-level value map.

        Args:
            query: (B, Q, C). reference_points: (B, Q, L, 2) as (x, y) or (B, Q, L, 4) as (cx, cy, w, h),
                normalised per level (already multiplied by valid ratios), padding area included.
            value: (B, S, C). spatial_shapes: (L, 2) long (h, w). level_start_index: (L,), unused (implied by
                spatial_shapes), kept for the shared signature.
            value_padding_mask: (B, S) bool, True = padding; those value tokens are zeroed.
            query_pos: (B, Q, C) added to the query for the offset / weight projections only.
            identity: (B, Q, C) residual; defaults to `query` (without query_pos).
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
        v = self.value_proj(value)
        if value_padding_mask is not None:
            v = v.masked_fill(value_padding_mask[..., None], 0.0)
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
        out = multi_scale_deformable_attn(v, spatial_shapes, locations, weights)
        return self.dropout(self.output_proj(out)) + identity
