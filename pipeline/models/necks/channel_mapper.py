"""Necks: backbone maps -> `num_outs` maps of C=256 channels [CO_DETR_SPEC 1.1 Neck, 6 ViT-L].

- `ChannelMapper` (mmdet `necks/channel_mapper.py`, the R50 and Swin-L configs): per input level a 1x1 conv
  (no bias, a norm follows) + GroupNorm(32, C), no activation; extra levels are 3x3 stride-2 pad-1 convs (no
  bias) + GN, the first on the RAW last input (C5), the next ones on the previous output.
  Init: Xavier-uniform on every conv. mmcv's `ConvModule` applies kaiming-normal in its constructor, but the
  detector's `init_weights()` then runs ChannelMapper's `init_cfg=Xavier(uniform)` over all Conv2d and does not
  reach the ConvModules again (they sit in a plain `nn.ModuleList`, which has no `init_weights`), so the
  authors' convs end up Xavier-uniform (gain 1); GN weight 1, bias 0.
  State-dict names match the authors': `convs.{i}.conv.weight`, `convs.{i}.gn.{weight,bias}`,
  `extra_convs.{j}.conv.weight`, `extra_convs.{j}.gn.*`.
- `SimpleFeaturePyramid`: the authors' ViT-L neck (`necks/sfp.py`, the same branches `p2..p6` and init) for any
  subset of its five levels, stride-16 ViT map -> strides 4, 8, 16, 32, 64; the pyramid of the timm ViT wrapper
  (`backbones/timm_backbones.ViTBackbone`), whose `out_indices` pick the levels.
- `build_neck(backbone, ...)`: ChannelMapper, or a pass-through for backbones that already end in their own
  pyramid neck (the ViT + SFP backbone, `backbone.has_neck`).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from pipeline.models.necks.sfp import reset_sfp_parameters, sfp_branch

__all__ = ["ChannelMapper", "ConvGN", "SimpleFeaturePyramid", "build_neck"]


class ConvGN(nn.Module):
    """Conv2d (no bias) + GroupNorm: mmcv `ConvModule(norm_cfg=GN, act_cfg=None)` with the same child names."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, num_groups: int):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=(kernel_size - 1) // 2, bias=False
        )
        self.gn = nn.GroupNorm(num_groups, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.gn(self.conv(x))


class ChannelMapper(nn.Module):
    """Map L backbone maps to `num_outs` maps of `out_channels` each.

    forward(feats: list of L maps (B, in_channels[i], H_i, W_i)) -> list of num_outs maps (B, out_channels, h, w):
    the first L keep their sizes, extra level k has half the size of level k-1 (ceil, 3x3 s2 p1 conv).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int = 256,
        num_outs: int = 5,
        num_groups: int = 32,
        kernel_size: int = 1,
    ):
        super().__init__()
        in_channels = [int(c) for c in in_channels]
        if not in_channels:
            raise ValueError("ChannelMapper needs at least one input level, got in_channels=[]")
        if num_outs < len(in_channels):
            raise ValueError(f"ChannelMapper num_outs={num_outs} must be >= the {len(in_channels)} input levels")
        if out_channels % num_groups:
            raise ValueError(f"out_channels={out_channels} is not divisible by num_groups={num_groups}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_outs = num_outs
        self.convs = nn.ModuleList(ConvGN(c, out_channels, kernel_size, 1, num_groups) for c in in_channels)
        extra_in = [in_channels[-1]] + [out_channels] * (num_outs - len(in_channels) - 1)
        self.extra_convs = nn.ModuleList(
            ConvGN(c, out_channels, 3, 2, num_groups) for c in extra_in[: num_outs - len(in_channels)]
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform convs (what the authors' init_weights leaves, see module docstring); GN 1 / 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        if len(feats) != len(self.convs):
            raise ValueError(f"ChannelMapper expects {len(self.convs)} input maps, got {len(feats)}")
        outs = [conv(x) for conv, x in zip(self.convs, feats)]
        for j, conv in enumerate(self.extra_convs):
            outs.append(conv(feats[-1] if j == 0 else outs[-1]))  # first extra level from the raw last input
        return outs


class SimpleFeaturePyramid(nn.Module):
    """The authors' SFP (`necks.sfp`, same branches) for any subset of its levels: one stride-16 map -> maps at
    strides 4 * 2**level for the requested `levels`.

    Level 0..4 = branches p2..p6 = strides 4, 8, 16, 32, 64 (the authors' ViT-L config uses all five).
    forward(feats: [ (B, in_channels, H/16, W/16) ]) -> list of (B, out_channels, h_l, w_l), in level order.
    """

    def __init__(self, in_channels: int = 1024, out_channels: int = 256, levels: Sequence[int] = (0, 1, 2, 3, 4)):
        super().__init__()
        levels = tuple(int(i) for i in levels)
        if not levels or any(i not in range(5) for i in levels) or list(levels) != sorted(set(levels)):
            raise ValueError(f"SFP levels must be increasing values in 0..4 (strides 4..64), got {levels}")
        self.levels = levels
        self.in_channels = in_channels
        self.out_channels = out_channels
        for i in levels:
            self.add_module(f"p{i + 2}", sfp_branch(i + 2, in_channels, out_channels))
        reset_sfp_parameters(self)

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        x = feats[-1]
        return [getattr(self, f"p{i + 2}")(x) for i in self.levels]


def build_neck(backbone: nn.Module, out_channels: int = 256, num_outs: int = 5) -> nn.Module:
    """The neck for `backbone` (anything with `out_channels: list[int]` and optional `has_neck: bool`).

    Backbones that end in their own pyramid (`has_neck=True`, the ViT + SFP backbone) get a pass-through
    (`nn.Identity`, no parameters), after checking that they already give `num_outs` maps of `out_channels`;
    every other backbone gets `ChannelMapper(backbone.out_channels, out_channels, num_outs)`.
    """
    chans = [int(c) for c in getattr(backbone, "out_channels")]  # noqa: B009 (duck-typed attribute)
    if getattr(backbone, "has_neck", False):
        if len(chans) != num_outs or any(c != out_channels for c in chans):
            raise ValueError(
                f"backbone with its own pyramid gives {len(chans)} maps of channels {chans}, the neck config asks "
                f"for {num_outs} maps of {out_channels}: set backbone.out_indices to {tuple(range(num_outs))}"
            )
        return nn.Identity()
    return ChannelMapper(chans, out_channels, num_outs)
