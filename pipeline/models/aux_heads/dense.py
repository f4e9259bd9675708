"""Building blocks shared by the dense auxiliary heads (ATSS, GFL, FCOS, RetinaNet: predictions at every location).

mmcv's `Scale` and `ConvModule` variants under the authors' key names, the two conv towers (`cls_convs`,
`reg_convs`: an `nn.Sequential`, keys `{i}.conv.*` / `{i}.gn.*` as mmdet's ModuleList), the heads' common init,
and the flattening of per-level maps into the anchor order (level-major, then (y, x, anchor) row-major).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Scale(nn.Module):
    """A learnable scalar multiplier (mmcv `Scale`); parameter key `scale`."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class ConvGNReLU(nn.Module):
    """3x3 conv without bias + GroupNorm + ReLU (mmcv `ConvModule` with GN); keys `conv.*`, `gn.*`."""

    def __init__(self, in_channels: int, out_channels: int, num_groups: int = 32) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(num_groups, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.gn(self.conv(x)))


class ConvReLU(nn.Module):
    """3x3 conv with bias + ReLU (mmcv `ConvModule` without norm); key `conv.*`."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv(x))


def conv_tower(
    block: Callable[[int, int], nn.Module], in_channels: int, feat_channels: int, stacked_convs: int
) -> nn.Sequential:
    """`stacked_convs` blocks in_channels -> feat_channels -> ... -> feat_channels (identity if 0)."""
    return nn.Sequential(
        *[block(in_channels if i == 0 else feat_channels, feat_channels) for i in range(stacked_convs)]
    )


def init_dense_head(head: nn.Module, cls_conv: nn.Conv2d, prior_prob: float) -> None:
    """mmdet init_cfg of the dense heads: Normal(std 0.01, bias 0) on every Conv2d of `head`, then the
    classification bias = -log((1 - p) / p) (sigmoid prior p)."""
    for m in head.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    nn.init.constant_(cls_conv.bias, -math.log((1 - prior_prob) / prior_prob))


def check_levels(head: nn.Module, feats: Sequence[Tensor], strides: Sequence[int]) -> None:
    """One input map per stride, else a ValueError naming the head."""
    if len(feats) != len(strides):
        raise ValueError(f"{type(head).__name__} expects {len(strides)} maps (strides {tuple(strides)}), "
                         f"got {len(feats)}")  # fmt: skip


def flatten_levels(maps: Sequence[Tensor], channels: int) -> Tensor:
    """Per level (B, A * channels, h, w) -> (B, sum_l h_l w_l A, channels): the anchor order."""
    b = maps[0].shape[0]
    return torch.cat([m.permute(0, 2, 3, 1).reshape(b, -1, channels) for m in maps], 1)
