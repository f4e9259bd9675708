"""The authors' simple feature pyramid for ViT-L (Sense-X/Co-DETR `mmdet/models/necks/sfp.py`, `SFP`, use_p2).

One stride-16 ViT map -> five 256-channel maps at strides 4, 8, 16, 32, 64 (P2..P6). NOT ViTDet's
deconvolution pyramid: up-sampling is nearest `Upsample(x2)` + 3x3 conv; every conv is bias-free and followed
by a channels-first LayerNorm (eps 1e-6; timm `LayerNorm2d`, the same function as the authors' hand-written
one) and, except the last, GELU:

    p2: up2, conv3 C->C/2, LN, GELU, up2, conv3 C/2->C/4, LN, GELU, conv1 C/4->256, LN, GELU, conv3, LN
    p3: up2, conv3 C->C/2, LN, GELU, conv1 C/2->256, LN, GELU, conv3, LN
    p4: conv1 C->256, LN, GELU, conv3, LN
    p5: maxpool(3, 2, 1), conv1 C->256, LN, GELU, conv3, LN
    p6: maxpool(3, 2, 1), conv3/2 C->C, LN, GELU, conv1 C->256, LN, GELU, conv3, LN

Sequential indices equal the authors' (`neck.p2.1.weight` ...), so their keys load unchanged. Init: the
authors' `init_cfg=Xavier(Conv2d, uniform)`, LayerNorm 1 / 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import LayerNorm2d
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["SFP", "sfp_branch"]

LN_EPS = 1e-6


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=(k - 1) // 2, bias=False)


def _ln(c: int) -> LayerNorm2d:
    return LayerNorm2d(c, eps=LN_EPS)


def _project(cin: int, cout: int) -> list[nn.Module]:
    """The tail of every branch: conv1 cin->cout, LN, GELU, conv3 cout->cout, LN."""
    return [_conv(cin, cout, 1), _ln(cout), nn.GELU(), _conv(cout, cout, 3), _ln(cout)]


def sfp_branch(level: int, in_channels: int, out_channels: int) -> nn.Sequential:
    """The branch producing P`level` (2..6, stride 2**level) from the stride-16 map (module docstring)."""
    c = in_channels
    if level == 2:
        return nn.Sequential(
            nn.Upsample(scale_factor=2), _conv(c, c // 2, 3), _ln(c // 2), nn.GELU(),
            nn.Upsample(scale_factor=2), _conv(c // 2, c // 4, 3), _ln(c // 4), nn.GELU(),
            *_project(c // 4, out_channels),
        )  # fmt: skip
    if level == 3:
        return nn.Sequential(
            nn.Upsample(scale_factor=2), _conv(c, c // 2, 3), _ln(c // 2), nn.GELU(), *_project(c // 2, out_channels)
        )
    if level == 4:
        return nn.Sequential(*_project(c, out_channels))
    if level == 5:
        return nn.Sequential(nn.MaxPool2d(kernel_size=3, stride=2, padding=1), *_project(c, out_channels))
    if level == 6:
        return nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1), _conv(c, c, 3, stride=2), _ln(c), nn.GELU(),
            *_project(c, out_channels),
        )  # fmt: skip
    raise ValueError(f"SFP levels are P2..P6, got P{level}")


def reset_sfp_parameters(module: nn.Module) -> None:
    """The authors' `init_cfg=Xavier(Conv2d, uniform)`; LayerNorm 1 / 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight)
        elif isinstance(m, LayerNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class SFP(nn.Module):
    """forward(feats: [ (B, in_channels, h, w) ]) -> [P2 (B, C, 4h, 4w), P3 (2h, 2w), P4 (h, w),
    P5 (ceil(h/2), ceil(w/2)), P6 (ceil(ceil(h/2)/2), ...)]; without use_p2 the list starts at P3.
    """

    def __init__(self, in_channels: int = 1024, out_channels: int = 256, use_p2: bool = True,
                 checkpointing: bool = False):  # fmt: skip
        super().__init__()
        c = in_channels
        if c % 4:
            raise ValueError(f"SFP in_channels must be a multiple of 4 (P2 narrows to C/4), got {c}")
        self.use_p2 = use_p2
        self.checkpointing = checkpointing
        self.in_channels = in_channels
        levels = (2, 3, 4, 5, 6) if use_p2 else (3, 4, 5, 6)
        self.levels = levels
        self.out_channels = [out_channels] * len(levels)
        self.strides = [2**lvl for lvl in levels]
        for lvl in levels:
            self.add_module(f"p{lvl}", sfp_branch(lvl, c, out_channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_sfp_parameters(self)

    def set_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of each branch (the authors' `use_act_checkpoint`)."""
        self.checkpointing = enable

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        if len(feats) != 1:
            raise ValueError(f"SFP takes the single stride-16 ViT map, got {len(feats)} maps")
        x = feats[0]
        branches = [getattr(self, f"p{lvl}") for lvl in self.levels]
        if self.checkpointing and torch.is_grad_enabled():
            return [checkpoint(b, x, use_reentrant=False) for b in branches]
        return [b(x) for b in branches]
