"""Padding masks of a zero-padded batch, their per-level downsampling and the valid-size ratios."""

from __future__ import annotations

import torch
from torch import Tensor


def padding_masks_from_sizes(img_sizes: Tensor, batch_shape: tuple[int, int]) -> Tensor:
    """(B, 2) long (h, w) of the unpadded images -> (B, H, W) bool mask, True outside the top-left image."""
    h, w = batch_shape
    ys = torch.arange(h, device=img_sizes.device)[None, :, None]
    xs = torch.arange(w, device=img_sizes.device)[None, None, :]
    return (ys >= img_sizes[:, 0, None, None]) | (xs >= img_sizes[:, 1, None, None])


def valid_ratio(mask: Tensor) -> Tensor:
    """(B, H, W) bool padding mask -> (B, 2) valid (w, h) fraction, from the first column / row."""
    _, h, w = mask.shape
    valid_h = torch.sum(~mask[:, :, 0], 1)
    valid_w = torch.sum(~mask[:, 0, :], 1)
    return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)


def downsample_mask(mask: Tensor, h: int, w: int) -> Tensor:
    """(B, H, W) bool -> (B, h, w) bool by nearest sampling, as the authors downsample the padding mask to each
    level (`F.interpolate(mask[None].float(), size=(h, w))`, mode "nearest").

    PyTorch's nearest rule written out (source index floor(i * (float)H / h), float32 as its kernels compute it),
    equal to `F.interpolate` (tests/test_export.py checks 1,000+ sizes x 5 strides), so that the same code runs
    eager and exported: the ONNX exporter turns `F.interpolate` into a Resize with the traced scale factors, which
    puts the padding of an image of another size at the wrong rows of the smaller levels. `h`, `w` may be SymInts.
    """
    big_h, big_w = mask.shape[-2:]
    one = torch.ones((), dtype=torch.float32, device=mask.device)

    def rows(n_out: int, n_in: int) -> Tensor:
        scale = (one * n_in) / (one * n_out)
        idx = (torch.arange(n_out, dtype=torch.float32, device=mask.device) * scale).floor().long()
        return idx.clamp(max=n_in - 1)

    return mask.index_select(1, rows(h, big_h)).index_select(2, rows(w, big_w))
