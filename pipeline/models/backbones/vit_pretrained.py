"""EVA-02 pretrained weights (patch 14) -> our ViT (patch 16), as the authors' `ViT.init_weights` does.

The authors start ViT-L from EVA-02 L (`eva02_L_pt_m38m_medft_in21k_ft_in1k_p14`; timm:
`eva02_large_patch14_448.mim_m38m_ft_in22k_in1k` and family). Their `init_weights`:

- unwraps `model_ema` / `state_dict` / `model` / `module`, strips `backbone.` and `module.` prefixes, skips the
  rotary tables (`*rope*`) and `relative_position_index`;
- resizes the patch kernel (C, 3, 14, 14) -> (C, 3, 16, 16) with plain bicubic interpolation (align_corners
  False; not timm's pseudo-inverse resampling);
- resizes the position embedding's grid to the 32x32 grid (pretrain_img_size 512 / 16), bicubic, the class
  position kept (a 448 px / patch 14 checkpoint already has 32x32: unchanged);
- loads non-strictly.

Accepted names: timm's (`attn.q_proj.bias`, `mlp.fc1_g` ...; = ours) and EVA's original ones (`attn.q_bias`,
`mlp.w1` ...; = the authors', mapped by `vit_keys.vit_block_leaf`). Dropped with a report: classifier and
pretraining-only keys (`cls_token`, `head.*`, `fc_norm.*`, `norm.*`, `mask_token`, `lm_head.*`), rotary
tables. Reported as missing (left at their init, as the authors): ours that the file lacks (`out_norm.*`).
Any other key, or a shape that does not fit after resizing, raises.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.checkpoints.vit_keys import vit_block_leaf
from pipeline.models.backbones.vit import ViT

__all__ = ["PretrainedReport", "eva02_to_vit", "load_eva02_pretrained"]

_NOT_OURS = re.compile(r"^(cls_token|mask_token|head\.|fc_norm\.|norm\.|lm_head\.)|(^|\.)rope[^.]*\.|"
                       r"relative_position_index$")  # fmt: skip


@dataclass
class PretrainedReport:
    """dropped: file keys not used; missing: our keys the file lacks (left at init); resized: key -> old, new."""

    dropped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    resized: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)


def _unwrap(state: Mapping[str, object]) -> dict[str, Tensor]:
    for key in ("model_ema", "state_dict", "model", "module"):
        inner = state.get(key)
        if isinstance(inner, Mapping):
            state = inner
            break
    out: dict[str, Tensor] = {}
    for k, v in state.items():
        if isinstance(v, Tensor):
            k = k[len("module.") :] if k.startswith("module.") else k
            out[k[len("backbone.") :] if k.startswith("backbone.") else k] = v
    return out


def _resize_pos_embed(pos: Tensor, grid: int) -> Tensor:
    """(1, 1 + g * g, C) -> (1, 1 + grid * grid, C): class position kept, the g x g grid bicubic-resized."""
    extra, tokens = pos[:, :1], pos[:, 1:]
    g, c = int(round(tokens.shape[1] ** 0.5)), tokens.shape[2]
    if g * g != tokens.shape[1]:
        raise ValueError(f"pretrained pos_embed must be 1 class + a square grid, got {tuple(pos.shape)}")
    if g == grid:
        return pos
    tokens = tokens.reshape(1, g, g, c).permute(0, 3, 1, 2).float()
    tokens = F.interpolate(tokens, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([extra.float(), tokens.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


def eva02_to_vit(state: Mapping[str, object], model: ViT) -> tuple[dict[str, Tensor], PretrainedReport]:
    """A timm or original EVA-02 state dict -> our ViT names, float32, patch kernel and pos grid resized."""
    expected = model.state_dict()
    report = PretrainedReport()
    out: dict[str, Tensor] = {}
    unknown, shapes = [], []
    for name, value in _unwrap(state).items():
        if _NOT_OURS.search(name):
            report.dropped.append(name)
            continue
        ours = vit_block_leaf(name)
        v = value.float()
        if ours == "patch_embed.proj.weight" and v.shape[-2:] != expected[ours].shape[-2:]:
            v = F.interpolate(v, size=tuple(expected[ours].shape[-2:]), mode="bicubic", align_corners=False)
        elif ours == "pos_embed" and v.shape != expected[ours].shape:
            v = _resize_pos_embed(v, int(round((expected[ours].shape[1] - 1) ** 0.5)))
        if v.shape != value.shape:
            report.resized[ours] = (tuple(value.shape), tuple(v.shape))
        if ours not in expected:
            unknown.append(name)
        elif v.shape != expected[ours].shape:
            shapes.append(f"{name} {tuple(v.shape)} != {tuple(expected[ours].shape)}")
        out[ours] = v
    if unknown or shapes:
        raise ValueError(f"EVA-02 weights do not fit this ViT: unknown keys {unknown[:8]}, shape mismatch {shapes[:8]}")
    report.missing = [k for k in expected if k not in out]
    return out, report


def load_eva02_pretrained(model: ViT, state: Mapping[str, object]) -> PretrainedReport:
    """Load EVA-02 weights into `model` in place (non-strict only for `report.missing`); returns the report."""
    mapped, report = eva02_to_vit(state, model)
    model.load_state_dict(mapped, strict=False)
    return report
