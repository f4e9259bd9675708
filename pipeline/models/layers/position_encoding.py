"""Sine positional encodings: of feature maps (from the padding mask) and of boxes / points.

All three follow the mmdet numerics used by Co-DETR (CO_DETR_SPEC.md 1.1):
frequencies T^(2*floor(i/2)/F), features interleaved as sin(even), cos(odd), scale 2*pi.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _interleave_sin_cos(pos: Tensor) -> Tensor:
    """(..., F) angles -> (..., F) as [sin(a0), cos(a1), sin(a2), cos(a3), ...]."""
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)


def _dim_t(num_feats: int, temperature: float, device: torch.device) -> Tensor:
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=device)
    return temperature ** (2 * (dim_t // 2) / num_feats)


class SinePositionalEncoding(nn.Module):
    """mmdet `SinePositionalEncoding` (no parameters).

    forward(mask (B, H, W) bool, True = padding) -> (B, 2*num_feats, H, W), channels [pos_y | pos_x].
    With `normalize`, the cumulative sums of the not-mask are divided by their last value (+eps) per
    column / row, after adding `offset`, and multiplied by `scale`.
    """

    def __init__(
        self,
        num_feats: int = 128,
        temperature: float = 10000.0,
        normalize: bool = True,
        offset: float = 0.0,
        eps: float = 1e-6,
        scale: float = 2 * math.pi,
    ) -> None:
        super().__init__()
        self.num_feats = num_feats
        self.temperature = temperature
        self.normalize = normalize
        self.offset = offset
        self.eps = eps
        self.scale = scale

    def forward(self, mask: Tensor) -> Tensor:
        not_mask = 1 - mask.to(torch.int)
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + self.eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + self.eps) * self.scale
        dim_t = _dim_t(self.num_feats, self.temperature, mask.device)
        pos_x = _interleave_sin_cos(x_embed[..., None] / dim_t)  # (B, H, W, F)
        pos_y = _interleave_sin_cos(y_embed[..., None] / dim_t)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (
            f"num_feats={self.num_feats}, temperature={self.temperature}, normalize={self.normalize}, "
            f"offset={self.offset}"
        )


def coordinate_to_encoding(
    coords: Tensor, num_feats: int = 128, temperature: float = 10000.0, scale: float = 2 * math.pi
) -> Tensor:
    """Sine embedding of points or boxes for the decoder's `ref_point_head` (DINO / Co-DINO order).

    coords: (..., 2) as (x, y) or (..., 4) as (cx, cy, w, h), normalised to [0, 1].
    Returns (..., 2*num_feats) ordered [y, x] or (..., 4*num_feats) ordered [y, x, w, h].
    """
    dim_t = _dim_t(num_feats, temperature, coords.device)
    emb = [_interleave_sin_cos(coords[..., i, None] * scale / dim_t) for i in range(coords.shape[-1])]
    if coords.shape[-1] == 2:
        return torch.cat((emb[1], emb[0]), dim=-1)
    if coords.shape[-1] == 4:
        return torch.cat((emb[1], emb[0], emb[2], emb[3]), dim=-1)
    raise ValueError(f"coordinate_to_encoding expects 2 or 4 coordinates, got {coords.shape[-1]}")


def get_proposal_pos_embed(
    proposals: Tensor, num_feats: int = 128, temperature: float = 10000.0, scale: float = 2 * math.pi
) -> Tensor:
    """Embedding of box logits for Co-Deformable queries and the Co-DINO aux queries (`aux_pos_trans`).

    proposals: (..., 4) box *logits* (inverse-sigmoid cxcywh); sigmoid is applied here.
    Returns (..., 4*num_feats) in the order [cx, cy, w, h].
    """
    dim_t = _dim_t(num_feats, temperature, proposals.device)
    pos = proposals.sigmoid()[..., None] * scale / dim_t  # (..., 4, F)
    return _interleave_sin_cos(pos).flatten(-2)
