"""The authors' ViT-L + SFP parameter names -> ours (`pipeline.models.backbones.vit`, `pipeline.models.necks.sfp`).

Inside a block our attention and MLP are timm's `EvaAttention` / `SwiGLU`, so six leaf names differ (the same
renames timm's own EVA checkpoint filter applies); everything else is identical:

    backbone.blocks.N.attn.q_bias           -> backbone.blocks.N.attn.q_proj.bias
    backbone.blocks.N.attn.v_bias           -> backbone.blocks.N.attn.v_proj.bias
    backbone.blocks.N.mlp.w1.*              -> backbone.blocks.N.mlp.fc1_g.*     (gate: silu(w1 x))
    backbone.blocks.N.mlp.w2.*              -> backbone.blocks.N.mlp.fc1_x.*
    backbone.blocks.N.mlp.ffn_ln.*          -> backbone.blocks.N.mlp.norm.*
    backbone.blocks.N.mlp.w3.*              -> backbone.blocks.N.mlp.fc2.*
    backbone.{pos_embed, patch_embed.proj.*, blocks.N.{norm1,norm2}.*, blocks.N.attn.{q,k,v}_proj.weight,
             blocks.N.attn.proj.*, out_norm.*}, neck.p2..p6.*                 -> unchanged

Dropped with a report: the rotary tables (`backbone.rope_win.freqs_cos`, `...freqs_sin`, `rope_glb.*`): ours
are computed from the configuration. Keys outside `backbone.` / `neck.` are not this map's business and come
back in `unmapped` (the detector keys go through `pipeline.checkpoints.convert`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["BLOCK_RENAMES", "ViTKeyReport", "vit_authors_to_ours", "vit_block_leaf"]

# (authors' leaf inside backbone.blocks.N., ours); first match wins, matched on the start of the leaf.
BLOCK_RENAMES: tuple[tuple[str, str], ...] = (
    ("attn.q_bias", "attn.q_proj.bias"),
    ("attn.v_bias", "attn.v_proj.bias"),
    ("mlp.w1.", "mlp.fc1_g."),
    ("mlp.w2.", "mlp.fc1_x."),
    ("mlp.ffn_ln.", "mlp.norm."),
    ("mlp.w3.", "mlp.fc2."),
)
_ROPE = re.compile(r"(^|\.)rope[^.]*\.freqs_(cos|sin)$")
_BLOCK = re.compile(r"^(blocks\.\d+\.)(.*)$")


@dataclass
class ViTKeyReport:
    """dropped_rope: rotary-table buffers dropped (recomputed); unmapped: keys outside backbone./neck."""

    dropped_rope: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)


def vit_block_leaf(name: str) -> str:
    """Authors' backbone-relative name (`blocks.3.mlp.w1.weight`) -> ours (`blocks.3.mlp.fc1_g.weight`)."""
    m = _BLOCK.match(name)
    if m is None:
        return name
    head, leaf = m.groups()
    for theirs, ours in BLOCK_RENAMES:
        if leaf == theirs or leaf.startswith(theirs):
            return head + ours + leaf[len(theirs) :]
    return name


def vit_authors_to_ours(
    state: Mapping[str, Tensor], backbone_prefix: str = "backbone.", neck_prefix: str = "neck."
) -> tuple[dict[str, Tensor], ViTKeyReport]:
    """Map the `backbone.*` / `neck.*` keys of an authors' ViT-L state dict to ours (same prefixes).

    Returns (mapped state dict, report). Our names are already accepted unchanged (the map is idempotent).
    """
    out: dict[str, Tensor] = {}
    report = ViTKeyReport()
    for name, value in state.items():
        if name.startswith(backbone_prefix):
            rest = name[len(backbone_prefix) :]
            if _ROPE.search(rest):
                report.dropped_rope.append(name)
                continue
            out[backbone_prefix + vit_block_leaf(rest)] = value
        elif name.startswith(neck_prefix):
            out[name] = value
        else:
            report.unmapped.append(name)
    return out, report
