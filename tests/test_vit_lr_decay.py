"""Layer-wise lr decay of the ViT (the authors' LayerDecayOptimizerConstructor: 24 layers, 0.8)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.models.backbones.vit import ViT
from pipeline.models.backbones.vit_lr_decay import layer_decay_multipliers, vit_layer_id
from pipeline.models.necks.sfp import SFP


def test_layer_ids_follow_the_authors() -> None:
    assert vit_layer_id("backbone.pos_embed", 24) == 0
    assert vit_layer_id("backbone.patch_embed.proj.weight", 24) == 0
    assert vit_layer_id("backbone.blocks.0.attn.q_bias", 24) == 1  # the authors' name
    assert vit_layer_id("backbone.blocks.23.mlp.fc2.weight", 24) == 24
    assert vit_layer_id("backbone.body.blocks.7.norm1.weight", 24) == 8  # deeper nesting
    for rest in ("backbone.out_norm.weight", "neck.p2.1.weight", "query_head.cls_branches.0.weight",
                 "transformer.decoder.layers.0.blocks.1.x"):  # fmt: skip
        assert vit_layer_id(rest, 24) == 25
    with pytest.raises(ValueError, match="block 24.*num_layers=24"):
        vit_layer_id("backbone.blocks.24.norm1.weight", 24)


def test_multipliers_on_a_small_vit_with_neck() -> None:
    with torch.device("meta"):
        model = nn.ModuleDict({
            "backbone": ViT(depth=3, embed_dim=128, num_heads=2, window_size=4, global_blocks=(2,)),
            "neck": SFP(128, 32),
        })  # fmt: skip
    mult = layer_decay_multipliers(model, 0.8, num_layers=3)
    assert set(mult) == {n for n, _ in model.named_parameters()}
    assert mult["backbone.blocks.2.attn.q_proj.weight"] == pytest.approx(0.8)  # top block: one decay step
    assert mult["backbone.blocks.1.mlp.fc1_g.bias"] == pytest.approx(0.8**2)
    assert mult["backbone.blocks.0.norm1.weight"] == pytest.approx(0.8**3)
    assert mult["backbone.pos_embed"] == mult["backbone.patch_embed.proj.weight"] == pytest.approx(0.8**4)
    assert mult["backbone.out_norm.weight"] == mult["neck.p6.8.bias"] == 1.0
    with pytest.raises(ValueError, match="layer decay must be in"):
        layer_decay_multipliers(model, 0.0, num_layers=3)
