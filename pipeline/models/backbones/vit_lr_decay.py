"""Layer-wise learning-rate decay for the ViT backbone (the authors' `LayerDecayOptimizerConstructor`).

Sense-X/Co-DETR `mmdet/core/optimizers/layer_decay_optimizer_constructor.py` with the released ViT-L config
(`num_layers=24`, `layer_decay_rate=0.8`): with N = num_layers + 2 and

    layer_id = 0            for backbone.pos_embed, backbone.cls_token, backbone.patch_embed.*
             = i + 1        for backbone.blocks.i.*
             = N - 1        for everything else (backbone.out_norm, the neck, every head)

a parameter's lr is base_lr * decay ** (N - 1 - layer_id). So the top block trains at 0.8 x the base lr, block
i at 0.8 ** (num_layers - i), the embeddings at the deepest rate 0.8 ** (num_layers + 1), and the rest of the
detector at 1. (The authors' weight-decay split, 0 for 1-D tensors and biases, is the optimizer's business.)
"""

from __future__ import annotations

import re

from torch import nn

__all__ = ["layer_decay_multipliers", "vit_layer_id"]

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_EMBED = re.compile(r"(?:^|\.)(pos_embed|cls_token|patch_embed)(?:\.|$)")


def vit_layer_id(param_name: str, num_layers: int, prefix: str = "backbone.") -> int:
    """Layer id of a detector parameter: 0 embeddings, i + 1 for blocks.i, num_layers + 1 for the rest.

    Only names under `prefix` belong to the ViT; `blocks.i` may sit deeper (`backbone.body.blocks.3.*`).
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if not param_name.startswith(prefix):
        return num_layers + 1
    rest = param_name[len(prefix) :]
    if _EMBED.search(rest):
        return 0
    m = _BLOCK.search(rest)
    if m is None:
        return num_layers + 1
    block = int(m.group(1))
    if block >= num_layers:
        raise ValueError(f"{param_name!r} is block {block}, but num_layers={num_layers} (blocks 0..{num_layers - 1})")
    return block + 1


def layer_decay_multipliers(
    model: nn.Module, decay: float, num_layers: int, prefix: str = "backbone."
) -> dict[str, float]:
    """lr multiplier decay ** (num_layers + 1 - layer_id) for every named parameter of `model`."""
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"layer decay must be in (0, 1], got {decay}")
    return {
        name: decay ** (num_layers + 1 - vit_layer_id(name, num_layers, prefix)) for name, _ in model.named_parameters()
    }
