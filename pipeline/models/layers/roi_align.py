"""RoIAlign = torchvision's forward, with a vectorised backward on CPU.

torchvision's CPU `_roi_align_backward` is one serial loop over every (RoI, channel, bin, sample) that recomputes
the bilinear weights per channel; on the Faster R-CNN aux head it cost more than the RoI head's forward and fully
connected layers together (bench/train_step.py --profile K=2). Here the forward is torchvision's own kernel (same
values, bit for bit) and the backward on CPU lists the (input pixel, output bin, weight) entries of every sampling
point once, shared by all channels, then sums `weight * grad_out[bin]` per input pixel with one sort and one
`embedding_bag` (parallel over pixels). The sampling points and bilinear weights follow torchvision's kernel
exactly (`roi_align_kernel.cpp`, float32 in the same operation order); the gradient equals torchvision's up to
float summation order (~1e-7 relative: torchvision divides `grad * w` by the sample count per sample and
accumulates in loop order). On CUDA, or without a gradient, `torchvision.ops.roi_align` is called unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align as tv_roi_align


def roi_align(
    feat: Tensor, rois: Tensor, output_size: int, spatial_scale: float, sampling_ratio: int = 0, aligned: bool = True
) -> Tensor:
    """feat: (B, C, H, W); rois: (R, 5) (batch index, x1, y1, x2, y2) in the units `spatial_scale` maps to feat
    pixels, same dtype as feat -> (R, C, S, S), S = output_size. Same contract as `torchvision.ops.roi_align`."""
    if feat.device.type != "cpu" or not (torch.is_grad_enabled() and feat.requires_grad):
        return tv_roi_align(feat, rois, output_size, spatial_scale=spatial_scale, sampling_ratio=sampling_ratio,
                            aligned=aligned)  # fmt: skip
    return _RoIAlignCPU.apply(feat, rois, int(output_size), float(spatial_scale), int(sampling_ratio), aligned)


def sample_entries(
    rois: Tensor, feat_hw: tuple[int, int], output_size: int, spatial_scale: float, sampling_ratio: int, aligned: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Every bilinear corner touched by RoIAlign, as torchvision's kernel computes it.

    rois: (R, 5) float. Returns pixel (E,) long = b * H * W + y * W + x, out_bin (E,) long = r * S * S + bin,
    weight (E,) = bilinear corner weight / number of samples of the bin; corners of samples outside the map
    (y < -1, y > H, x < -1 or x > W) are left out, as in the kernel.
    """
    h, w = feat_hw
    s = output_size
    dt, device = rois.dtype, rois.device
    num_rois = rois.shape[0]
    scale = torch.tensor(spatial_scale, dtype=dt, device=device)  # the kernel casts the scale to T
    offset = 0.5 if aligned else 0.0
    x1, y1 = rois[:, 1] * scale - offset, rois[:, 2] * scale - offset
    x2, y2 = rois[:, 3] * scale - offset, rois[:, 4] * scale - offset
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_h, bin_w = roi_h / s, roi_w / s
    if sampling_ratio > 0:
        grid_h = torch.full((num_rois,), sampling_ratio, dtype=torch.long, device=device)
        grid_w = grid_h
    else:  # adaptive: ceil(roi size / S), an empty grid for degenerate boxes
        grid_h, grid_w = torch.ceil(roi_h / s).long().clamp(min=0), torch.ceil(roi_w / s).long().clamp(min=0)
    per_bin = grid_h * grid_w
    count = per_bin.to(dt)

    # one row per sampling point, in the kernel's loop order (roi, ph, pw, iy, ix)
    per_roi = per_bin * (s * s)
    roi = torch.repeat_interleave(torch.arange(num_rois, device=device), per_roi)  # (P,)
    local = torch.arange(roi.numel(), device=device) - (per_roi.cumsum(0) - per_roi)[roi]
    gh, gw, nb = grid_h[roi], grid_w[roi], per_bin[roi]
    bin_id, within = local // nb, local % nb
    ph, pw = bin_id // s, bin_id % s
    iy, ix = within // gw, within % gw
    bh, bw = bin_h[roi], bin_w[roi]
    y = y1[roi] + ph.to(dt) * bh + (iy.to(dt) + 0.5) * bh / gh.to(dt)
    x = x1[roi] + pw.to(dt) * bw + (ix.to(dt) + 0.5) * bw / gw.to(dt)

    inside = ~((y < -1.0) | (y > h) | (x < -1.0) | (x > w))
    y, x = y.clamp(min=0), x.clamp(min=0)
    y_lo, x_lo = y.long(), x.long()  # truncation = floor for y, x >= 0
    y_edge, x_edge = y_lo >= h - 1, x_lo >= w - 1
    y_lo, x_lo = torch.where(y_edge, h - 1, y_lo), torch.where(x_edge, w - 1, x_lo)
    y_hi, x_hi = torch.where(y_edge, y_lo, y_lo + 1), torch.where(x_edge, x_lo, x_lo + 1)
    y, x = torch.where(y_edge, y_lo.to(dt), y), torch.where(x_edge, x_lo.to(dt), x)
    ly, lx = y - y_lo.to(dt), x - x_lo.to(dt)
    hy, hx = 1.0 - ly, 1.0 - lx
    weights = torch.stack([hy * hx, hy * lx, ly * hx, ly * lx], 1) / count[roi, None]  # (P, 4)
    base = rois[roi, 0].long() * (h * w)
    pixels = torch.stack([y_lo * w + x_lo, y_lo * w + x_hi, y_hi * w + x_lo, y_hi * w + x_hi], 1) + base[:, None]
    out_bin = (roi * (s * s) + bin_id)[:, None].expand(-1, 4)
    keep = inside[:, None].expand(-1, 4)
    return pixels[keep], out_bin[keep], weights[keep]


class _RoIAlignCPU(torch.autograd.Function):
    """torchvision forward; backward = sorted weighted row sums (see the module docstring)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, feat: Tensor, rois: Tensor, output_size: int, spatial_scale: float, sampling_ratio: int, aligned: bool
    ) -> Tensor:
        ctx.save_for_backward(rois)
        ctx.args = (tuple(feat.shape), output_size, spatial_scale, sampling_ratio, aligned)
        return torch.ops.torchvision.roi_align(
            feat, rois, spatial_scale, output_size, output_size, sampling_ratio, aligned
        )

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (rois,) = ctx.saved_tensors
        (b, c, h, w), s, spatial_scale, sampling_ratio, aligned = ctx.args
        pixels, out_bin, weights = sample_entries(rois, (h, w), s, spatial_scale, sampling_ratio, aligned)
        grad_rows = grad_out.permute(0, 2, 3, 1).reshape(-1, c).to(rois.dtype)  # (R * S * S, C)
        order = torch.argsort(pixels, stable=True)
        counts = torch.bincount(pixels, minlength=b * h * w)
        offsets = counts.cumsum(0) - counts
        grad = F.embedding_bag(out_bin[order], grad_rows, offsets, per_sample_weights=weights[order], mode="sum")
        grad = grad.view(b, h, w, c).permute(0, 3, 1, 2).to(grad_out.dtype)  # (B, C, H, W), channels-last strides
        return grad, None, None, None, None, None
