"""Multi-scale adapter: encoder memory -> the 6 feature maps of the auxiliary heads (CO_DETR_SPEC.md 1.1, paper 3.2).

The encoder memory (B, sum(h_l w_l), C) is split back per level into (B, C, h_l, w_l) maps (padding positions
included, as the authors do), and a stride-128 map is added by `downsample` = Conv3x3 stride 2 (with bias) + GN(32)
applied to the last (stride-64) map. The authors' keys `query_head.downsample.0/1.*` map to `downsample.0/1.*`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pipeline.models.layers.deform_attn import level_hw


class MultiScaleAdapter(nn.Module):
    """forward(memory (B, S, C), spatial_shapes (L, 2) long (h, w) or a sequence of (h, w)) -> list of L + 1 maps
    (B, C, h_l, w_l); the last one is the extra level at twice the last stride."""

    def __init__(self, embed_dims: int = 256, num_groups: int = 32) -> None:
        super().__init__()
        if embed_dims % num_groups:
            raise ValueError(f"embed_dims {embed_dims} is not divisible by num_groups {num_groups}")
        self.embed_dims = embed_dims
        self.downsample = nn.Sequential(
            nn.Conv2d(embed_dims, embed_dims, kernel_size=3, stride=2, padding=1, bias=True),
            nn.GroupNorm(num_groups, embed_dims),
        )
        # PyTorch default init for the conv, as the authors (they leave it to nn.Conv2d's own init)

    def split(self, memory: Tensor, spatial_shapes: Tensor | Sequence[tuple[int, int]]) -> list[Tensor]:
        """(B, S, C) -> per level (B, C, h, w)."""
        shapes = level_hw(spatial_shapes)  # Python ints: read back only when given a tensor
        total = sum(h * w for h, w in shapes)
        if memory.dim() != 3 or memory.shape[1] != total:
            raise ValueError(f"memory must be (B, {total}, C) for spatial_shapes {shapes}, got {tuple(memory.shape)}")
        b, _, c = memory.shape
        chunks = torch.split(memory, [h * w for h, w in shapes], dim=1)
        return [x.transpose(1, 2).reshape(b, c, h, w) for x, (h, w) in zip(chunks, shapes)]

    def forward(self, memory: Tensor, spatial_shapes: Tensor | Sequence[tuple[int, int]]) -> list[Tensor]:
        maps = self.split(memory, spatial_shapes)
        maps.append(self.downsample(maps[-1]))
        return maps
