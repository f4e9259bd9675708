"""Deformable transformer encoder (post-norm, CO_DETR_SPEC.md 1.1 Encoder) and its reference points.

Layer: x = LN(MSDeformAttn(x + pos -> sample x) + x); x = LN(FFN(x) + x). The residual lives inside the
attention module (mmcv semantics) and padded value tokens are zeroed there.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pipeline.models.layers.deform_attn import MultiScaleDeformableAttention, SpatialHW, level_hw


class FFN(nn.Module):
    """mmcv FFN with identity: x + dropout(linear2(dropout(relu(linear1(x)))))."""

    def __init__(self, embed_dims: int = 256, ffn_dim: int = 2048, dropout: float = 0.0) -> None:
        super().__init__()
        self.linear1 = nn.Linear(embed_dims, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, embed_dims)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.dropout(self.linear2(self.dropout(torch.relu(self.linear1(x)))))


class DeformableEncoderLayer(nn.Module):
    def __init__(
        self,
        embed_dims: int = 256,
        num_heads: int = 8,
        num_levels: int = 5,
        num_points: int = 4,
        ffn_dim: int = 2048,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(embed_dims, num_heads, num_levels, num_points, dropout)
        self.norm1 = nn.LayerNorm(embed_dims)
        self.ffn = FFN(embed_dims, ffn_dim, dropout)
        self.norm2 = nn.LayerNorm(embed_dims)

    def forward(
        self,
        src: Tensor,
        pos: Tensor,
        reference_points: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        padding_mask: Tensor | None,
        spatial_hw: SpatialHW | None = None,
    ) -> Tensor:
        """src, pos: (B, S, C); reference_points: (B, S, L, 2); padding_mask: (B, S) True = pad;
        spatial_hw: spatial_shapes as Python ints (no host sync in the attention kernel)."""
        src = self.self_attn(
            src, reference_points, src, spatial_shapes, level_start_index, padding_mask, query_pos=pos,
            spatial_hw=spatial_hw,
        )
        src = self.norm1(src)
        return self.norm2(self.ffn(src))


class DeformableEncoder(nn.Module):
    """Stack of encoder layers; the first `checkpoint_layers` use activation checkpointing in training."""

    def __init__(self, layers: list[DeformableEncoderLayer], checkpoint_layers: int = 0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.checkpoint_layers = checkpoint_layers

    def forward(
        self,
        src: Tensor,
        pos: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        valid_ratios: Tensor,
        padding_mask: Tensor | None,
        spatial_hw: SpatialHW | None = None,
    ) -> Tensor:
        """src, pos: (B, S, C) flattened levels; valid_ratios: (B, L, 2) as (w, h). Returns memory (B, S, C).
        spatial_hw: spatial_shapes as Python ints; read from spatial_shapes once here if not given."""
        if spatial_hw is None:
            spatial_hw = level_hw(spatial_shapes)
        reference_points = encoder_reference_points(spatial_hw, valid_ratios)
        for i, layer in enumerate(self.layers):
            args = (src, pos, reference_points, spatial_shapes, level_start_index, padding_mask, spatial_hw)
            if i < self.checkpoint_layers and self.training and torch.is_grad_enabled():
                src = checkpoint(layer, *args, use_reentrant=False)
            else:
                src = layer(*args)
        return src


def encoder_reference_points(spatial_shapes: Tensor | SpatialHW, valid_ratios: Tensor) -> Tensor:
    """Pixel centres of every level, normalised by the valid size, then scaled by every level's valid ratio.

    spatial_shapes: (L, 2) long (h, w), or the same as Python ints (no host sync); valid_ratios: (B, L, 2) (w, h).
    Returns (B, S, L, 2) as (x, y).
    """
    device = valid_ratios.device
    points = []
    for lvl, (h, w) in enumerate(level_hw(spatial_shapes)):
        # arange + 0.5 == the authors' linspace(0.5, h - 0.5, h) bit for bit (step exactly 1); linspace's step
        # count would specialise an exported graph to the example's size
        ref_y, ref_x = torch.meshgrid(
            torch.arange(h, dtype=torch.float32, device=device) + 0.5,
            torch.arange(w, dtype=torch.float32, device=device) + 0.5,
            indexing="ij",
        )
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
        points.append(torch.stack((ref_x, ref_y), -1))
    reference_points = torch.cat(points, 1)  # (B, S, 2)
    return reference_points[:, :, None] * valid_ratios[:, None]
