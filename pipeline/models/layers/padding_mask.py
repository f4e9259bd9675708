"""Padding masks of a zero-padded batch and the valid-size ratios derived from them."""

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
