"""Multi-scale deformable attention as Triton kernels (CUDA): forward and backward, float32 accumulation.

Same semantics as `deform_attn.multi_scale_deformable_attn_reference` (bilinear, align_corners=False, zero
padding). `deform_attn.multi_scale_deformable_attn` picks this kernel on CUDA when triton imports.

- Forward: one program per BLOCK_N bags (a bag = one (batch, query, head)); for every level and point it
  computes the 4 corners, loads their Dh-vectors (corners outside the level are masked loads of zero) and
  accumulates attn * bilinear weight * value in float32 (float64 for float64 inputs).
- Backward: the same tiling recomputes the corners from the sampling locations (nothing but the inputs is
  saved, like the authors' CUDA kernel). Per corner it forms s = <grad_out, value corner>, from which the
  attention-weight and location gradients follow in closed form, and adds attn * weight * grad_out to the
  value gradient with float32 atomics; corners outside the level add nothing (masked), so no row collects
  them.

Inputs may be bf16 / fp16 / fp32 / fp64 in any mix: loads are upcast, the output is value's dtype, each
gradient its input's dtype. No host sync: level shapes and starts stay on the device.
Tested against the reference on CPU through Triton's interpreter (TRITON_INTERPRET=1) in
tests/test_deform_attn_triton.py; timed on a GPU by bench/gpu_check.py.

Notation as in deform_attn.py: B, Q, S, nH, Dh, L, P; N = B*Q*nH bags.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_N_FWD = 64
BLOCK_N_BWD = 32


@triton.jit
def _corner(value_ptr, token, head, nH, Dh, d, load_mask):
    """(BLOCK_N, BLOCK_D) value rows of the given tokens / heads; masked-out rows read 0."""
    row = token * nH + head
    return tl.load(value_ptr + row[:, None] * Dh + d[None, :], mask=load_mask, other=0.0)


@triton.jit
def _point(loc_ptr, attn_ptr, shapes_ptr, starts_ptr, bag, bag_ok, lvl, pt, L, P, USE_FP64: tl.constexpr):
    """Pixel position, fractions, integer corners and validity of sampling point (lvl, pt) of every bag."""
    acc_ty = tl.float64 if USE_FP64 else tl.float32
    h_l = tl.load(shapes_ptr + 2 * lvl)
    w_l = tl.load(shapes_ptr + 2 * lvl + 1)
    start = tl.load(starts_ptr + lvl)
    j = bag * (L * P) + lvl * P + pt  # index of the point in attention_weights
    x = tl.load(loc_ptr + 2 * j, mask=bag_ok, other=0.0).to(acc_ty)
    y = tl.load(loc_ptr + 2 * j + 1, mask=bag_ok, other=0.0).to(acc_ty)
    a = tl.load(attn_ptr + j, mask=bag_ok, other=0.0).to(acc_ty)
    wf = w_l.to(acc_ty)
    hf = h_l.to(acc_ty)
    # pixel = loc * size - 0.5; points far outside only need to stay outside: clamp to [-2, size].
    px = tl.minimum(tl.maximum(x * wf - 0.5, -2.0), wf)
    py = tl.minimum(tl.maximum(y * hf - 0.5, -2.0), hf)
    x0f = tl.floor(px)
    y0f = tl.floor(py)
    fx = px - x0f
    fy = py - y0f
    x0 = x0f.to(tl.int64)
    y0 = y0f.to(tl.int64)
    okx0 = (x0 >= 0) & (x0 < w_l)
    okx1 = (x0 >= -1) & (x0 < w_l - 1)
    oky0 = (y0 >= 0) & (y0 < h_l)
    oky1 = (y0 >= -1) & (y0 < h_l - 1)
    return j, a, wf, hf, fx, fy, x0, y0, start, w_l, okx0, okx1, oky0, oky1


@triton.jit
def _fwd_kernel(value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr, N, Q, S, nH, Dh, L, P,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, USE_FP64: tl.constexpr):
    acc_ty = tl.float64 if USE_FP64 else tl.float32
    bag = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    bag_ok = bag < N
    d = tl.arange(0, BLOCK_D)
    d_ok = d < Dh
    head = bag % nH
    batch_token = (bag // (Q * nH)) * S  # first token of the bag's image
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=acc_ty)
    for lvl in range(L):  # runtime loops: a small kernel that compiles fast (20 unrolled points do not)
        for pt in range(P):
            j, a, wf, hf, fx, fy, x0, y0, start, w_l, okx0, okx1, oky0, oky1 = _point(
                loc_ptr, attn_ptr, shapes_ptr, starts_ptr, bag, bag_ok, lvl, pt, L, P, USE_FP64)
            tok = batch_token + start + y0 * w_l + x0  # token of the top-left corner
            v00 = _corner(value_ptr, tok, head, nH, Dh, d, (bag_ok & oky0 & okx0)[:, None] & d_ok[None, :])
            v01 = _corner(value_ptr, tok + 1, head, nH, Dh, d, (bag_ok & oky0 & okx1)[:, None] & d_ok[None, :])
            v10 = _corner(value_ptr, tok + w_l, head, nH, Dh, d,
                          (bag_ok & oky1 & okx0)[:, None] & d_ok[None, :])
            v11 = _corner(value_ptr, tok + w_l + 1, head, nH, Dh, d,
                          (bag_ok & oky1 & okx1)[:, None] & d_ok[None, :])
            gx = 1.0 - fx
            gy = 1.0 - fy
            acc += (a * gy * gx)[:, None] * v00.to(acc_ty)
            acc += (a * gy * fx)[:, None] * v01.to(acc_ty)
            acc += (a * fy * gx)[:, None] * v10.to(acc_ty)
            acc += (a * fy * fx)[:, None] * v11.to(acc_ty)
    offs = bag[:, None] * Dh + d[None, :]
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=bag_ok[:, None] & d_ok[None, :])


@triton.jit
def _bwd_kernel(value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, grad_out_ptr, grad_value_ptr,
                grad_loc_ptr, grad_attn_ptr, N, Q, S, nH, Dh, L, P, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, USE_FP64: tl.constexpr):
    acc_ty = tl.float64 if USE_FP64 else tl.float32
    bag = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    bag_ok = bag < N
    d = tl.arange(0, BLOCK_D)
    d_ok = d < Dh
    head = bag % nH
    batch_token = (bag // (Q * nH)) * S
    tile_ok = bag_ok[:, None] & d_ok[None, :]
    g = tl.load(grad_out_ptr + bag[:, None] * Dh + d[None, :], mask=tile_ok, other=0.0).to(acc_ty)
    for lvl in range(L):  # runtime loops: a small kernel that compiles fast (20 unrolled points do not)
        for pt in range(P):
            j, a, wf, hf, fx, fy, x0, y0, start, w_l, okx0, okx1, oky0, oky1 = _point(
                loc_ptr, attn_ptr, shapes_ptr, starts_ptr, bag, bag_ok, lvl, pt, L, P, USE_FP64)
            tok = batch_token + start + y0 * w_l + x0
            m00 = (bag_ok & oky0 & okx0)[:, None] & d_ok[None, :]
            m01 = (bag_ok & oky0 & okx1)[:, None] & d_ok[None, :]
            m10 = (bag_ok & oky1 & okx0)[:, None] & d_ok[None, :]
            m11 = (bag_ok & oky1 & okx1)[:, None] & d_ok[None, :]
            # s_c = <grad_out, value at corner c>; corners outside read 0, so they drop out of every sum.
            s00 = tl.sum(g * _corner(value_ptr, tok, head, nH, Dh, d, m00).to(acc_ty), axis=1)
            s01 = tl.sum(g * _corner(value_ptr, tok + 1, head, nH, Dh, d, m01).to(acc_ty), axis=1)
            s10 = tl.sum(g * _corner(value_ptr, tok + w_l, head, nH, Dh, d, m10).to(acc_ty), axis=1)
            s11 = tl.sum(g * _corner(value_ptr, tok + w_l + 1, head, nH, Dh, d, m11).to(acc_ty), axis=1)
            gx = 1.0 - fx
            gy = 1.0 - fy
            grad_a = gy * (gx * s00 + fx * s01) + fy * (gx * s10 + fx * s11)
            grad_x = a * (gy * (s01 - s00) + fy * (s11 - s10)) * wf  # d pixel / d location = size
            grad_y = a * (gx * (s10 - s00) + fx * (s11 - s01)) * hf
            tl.store(grad_attn_ptr + j, grad_a, mask=bag_ok)
            tl.store(grad_loc_ptr + 2 * j, grad_x, mask=bag_ok)
            tl.store(grad_loc_ptr + 2 * j + 1, grad_y, mask=bag_ok)
            # value gradient: attn * bilinear weight * grad_out into each corner row inside the level.
            base = (tok * nH + head)[:, None] * Dh + d[None, :]
            row_step = w_l * nH * Dh
            tl.atomic_add(grad_value_ptr + base, (a * gy * gx)[:, None] * g, mask=m00)
            tl.atomic_add(grad_value_ptr + base + nH * Dh, (a * gy * fx)[:, None] * g, mask=m01)
            tl.atomic_add(grad_value_ptr + base + row_step, (a * fy * gx)[:, None] * g, mask=m10)
            tl.atomic_add(grad_value_ptr + base + row_step + nH * Dh, (a * fy * fx)[:, None] * g, mask=m11)


def _level_tables(spatial_shapes: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """(L, 2) int64 (h, w) and (L,) int64 first token of each level, on `device` (device ops, no sync)."""
    shapes = spatial_shapes.to(device=device, dtype=torch.int64).contiguous()
    sizes = shapes[:, 0] * shapes[:, 1]
    return shapes, (sizes.cumsum(0) - sizes).contiguous()


def _device_guard(t: Tensor) -> contextlib.AbstractContextManager:
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _use_fp64(*tensors: Tensor) -> bool:
    return any(t.dtype == torch.float64 for t in tensors)


class _TritonMSDeformAttn(torch.autograd.Function):
    """Triton forward / backward; saves only the inputs (and the (L, 2) level shapes)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor
    ) -> Tensor:
        value = value.contiguous()
        sampling_locations = sampling_locations.contiguous()
        attention_weights = attention_weights.contiguous()
        B, S, nH, Dh = value.shape
        _, Q, _, L, P, _ = sampling_locations.shape
        N = B * Q * nH
        shapes, starts = _level_tables(spatial_shapes, value.device)
        out = torch.empty(B, Q, nH, Dh, dtype=value.dtype, device=value.device)
        if N > 0:
            with _device_guard(value):
                _fwd_kernel[(triton.cdiv(N, BLOCK_N_FWD),)](
                    value, shapes, starts, sampling_locations, attention_weights, out, N, Q, S, nH, Dh, L, P,
                    BLOCK_N=BLOCK_N_FWD, BLOCK_D=triton.next_power_of_2(Dh),
                    USE_FP64=_use_fp64(value, sampling_locations, attention_weights))
        ctx.save_for_backward(value, shapes, sampling_locations, attention_weights)
        return out.view(B, Q, nH * Dh)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx, grad_out: Tensor
    ) -> tuple[Tensor | None, None, Tensor | None, Tensor | None]:
        value, shapes, sampling_locations, attention_weights = ctx.saved_tensors
        B, S, nH, Dh = value.shape
        _, Q, _, L, P, _ = sampling_locations.shape
        N = B * Q * nH
        fp64 = _use_fp64(value, sampling_locations, attention_weights)
        acc = torch.float64 if fp64 else torch.float32
        sizes = shapes[:, 0] * shapes[:, 1]
        starts = (sizes.cumsum(0) - sizes).contiguous()
        grad_value = torch.zeros(value.shape, dtype=acc, device=value.device)
        grad_loc = torch.empty(sampling_locations.shape, dtype=acc, device=value.device)
        grad_attn = torch.empty(attention_weights.shape, dtype=acc, device=value.device)
        if N > 0:
            with _device_guard(value):
                _bwd_kernel[(triton.cdiv(N, BLOCK_N_BWD),)](
                    value, shapes, starts, sampling_locations, attention_weights, grad_out.contiguous(),
                    grad_value, grad_loc, grad_attn, N, Q, S, nH, Dh, L, P, BLOCK_N=BLOCK_N_BWD,
                    BLOCK_D=triton.next_power_of_2(Dh), USE_FP64=fp64)
        need_value, _, need_loc, need_attn = ctx.needs_input_grad
        return (grad_value.to(value.dtype) if need_value else None, None,
                grad_loc.to(sampling_locations.dtype) if need_loc else None,
                grad_attn.to(attention_weights.dtype) if need_attn else None)


def multi_scale_deformable_attn_triton(value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor,
                                       attention_weights: Tensor) -> Tensor:
    """Triton kernel; arguments and result as `deform_attn.multi_scale_deformable_attn` (inputs checked
    there). CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (tests)."""
    return _TritonMSDeformAttn.apply(value, spatial_shapes, sampling_locations, attention_weights)
