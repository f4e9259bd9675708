"""Backbone and neck from the model config: the authors' ViT + SFP, or a timm backbone + ChannelMapper.

    backbone = build_backbone(cfg.backbone)                       # name "vit_authors" -> backbones.vit.ViT
    neck = build_neck(backbone, cfg.neck.out_channels, cfg.neck.num_outs)   # ViT -> necks.sfp.SFP

The authors' ViT (`backbone.name: vit_authors`, CO_DETR_SPEC.md 6, golden fixture vit_l_sfp) is configured by
`backbone.vit` (ViTConfig) plus the shared fields `drop_path_rate`, `checkpointing` (every block and every SFP
branch), `frozen_stages` (-1 nothing; 0 patch + position embeddings; k > 0 also blocks 0..k-1), `pretrained` /
`weights` (EVA-02 weights through `vit_pretrained.load_eva02_pretrained`, as the authors' `init_weights`):

- `pretrained: true`: timm's `vit.pretrained_name` with its pretrained weights (a download, or timm's cache;
  `timm_kwargs` such as `pretrained_cfg_overlay={"file": path}` go to `timm.create_model`), mapped and resized
  (patch 14 -> 16, position grid -> 32 x 32); the report of what did not map is printed;
- `weights: URI`: an EVA-02 state dict file (timm's or the original EVA naming, e.g. the authors'
  `eva02_L_pt_m38m_medft_in21k_ft_in1k_p14.pt`), same mapping. A file of our own names loads the same way.

Every other name goes to `timm_backbones.build_backbone` unchanged (ResNet, Swin, timm ViT / EVA-02).
Construction allocates nothing data dependent, so it works under `with torch.device("meta")`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from pipeline.models.backbones import timm_backbones
from pipeline.models.backbones.frozen_bn import freeze_module
from pipeline.models.backbones.vit import ViT
from pipeline.models.config import VIT_AUTHORS

if TYPE_CHECKING:
    from pipeline.models.backbones.vit_pretrained import PretrainedReport
    from pipeline.models.config import BackboneConfig

__all__ = ["VIT_AUTHORS", "build_backbone", "build_neck", "build_vit", "freeze_vit"]


def build_backbone(cfg: BackboneConfig, **timm_kwargs: Any) -> nn.Module:
    """The backbone of `cfg`: the authors' ViT for name "vit_authors", else the timm wrapper."""
    if cfg.name == VIT_AUTHORS:
        return build_vit(cfg, **timm_kwargs)
    return timm_backbones.build_backbone(cfg, **timm_kwargs)


def build_neck(backbone: nn.Module, out_channels: int = 256, num_outs: int = 5) -> nn.Module:
    """SFP (P2..P6 with num_outs 5, P3..P6 with 4) after the authors' ViT; ChannelMapper (or the pass-through of
    the timm ViT wrapper) otherwise (`necks.channel_mapper.build_neck`)."""
    if isinstance(backbone, ViT):
        from pipeline.models.necks.sfp import SFP

        if num_outs not in (4, 5):
            raise ValueError(f"model.neck.num_outs must be 5 (P2..P6) or 4 (P3..P6) after the ViT, got {num_outs}")
        return SFP(backbone.embed_dim, out_channels, use_p2=num_outs == 5, checkpointing=backbone.checkpointing)
    from pipeline.models.necks.channel_mapper import build_neck as channel_mapper_neck

    return channel_mapper_neck(backbone, out_channels, num_outs)


def freeze_vit(vit: ViT, frozen_stages: int) -> list[str]:
    """Freeze the embeddings (frozen_stages >= 0) and blocks 0..frozen_stages-1; returns the frozen names.
    The authors train every ViT-L parameter (frozen_stages -1 in the recipes)."""
    if not -1 <= frozen_stages <= vit.depth:
        raise ValueError(f"model.backbone.frozen_stages={frozen_stages} must be in -1..{vit.depth} for this ViT")
    if frozen_stages < 0:
        return []
    vit.pos_embed.requires_grad_(False)
    names = ["pos_embed", "patch_embed"] + [f"blocks.{i}" for i in range(frozen_stages)]
    for name in names[1:]:
        freeze_module(vit.get_submodule(name))
    return names


def build_vit(cfg: BackboneConfig, **timm_kwargs: Any) -> ViT:
    """The authors' ViT for `cfg` (BackboneConfig with name "vit_authors"); see the module docstring."""
    v = cfg.vit
    vit = ViT(
        img_size=v.img_size, patch_size=v.patch_size, embed_dim=v.embed_dim, depth=v.depth, num_heads=v.num_heads,
        mlp_ratio=v.mlp_ratio, drop_path_rate=cfg.drop_path_rate, window_size=v.window_size,
        global_blocks=v.global_blocks, use_lsj=v.use_lsj, pretrain_img_size=v.pretrain_img_size,
        checkpointing=cfg.checkpointing,
    )  # fmt: skip
    report = None
    if cfg.weights:
        report = load_vit_weights(vit, timm_backbones._read_state_dict(cfg.weights))
    elif cfg.pretrained:
        import timm

        body = timm.create_model(v.pretrained_name, pretrained=True, num_classes=0, **timm_kwargs)
        report = load_vit_weights(vit, body.state_dict())
    if report is not None:
        src = cfg.weights or v.pretrained_name
        print(f"[backbone] EVA-02 weights {src}: dropped {len(report.dropped)} {report.dropped[:6]}, "
              f"left at init {report.missing}, resized {report.resized}")  # fmt: skip
    freeze_vit(vit, cfg.frozen_stages)
    return vit


def load_vit_weights(vit: ViT, state: dict) -> PretrainedReport:
    """EVA-02 (timm or original names) or our own ViT state dict -> `vit`, with the authors' resizing."""
    from pipeline.models.backbones.vit_pretrained import load_eva02_pretrained

    return load_eva02_pretrained(vit, state)
