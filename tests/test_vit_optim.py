"""`train.layer_decay` through build_optimizer: the authors' ViT layer-wise lr decay in the param groups' lr_mult
(and their lr), on a small ViT Co-DINO built from the ViT-L LVIS recipe with the small-ViT overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.models import build_model
from pipeline.train.config import TrainConfig
from pipeline.train.optim import build_optimizer, lr_factor, set_lr

REPO = Path(__file__).resolve().parents[1]
SMALL_VIT = ["model.backbone.vit.depth=3", "model.backbone.vit.embed_dim=64", "model.backbone.vit.num_heads=2",
             "model.backbone.vit.window_size=4", "model.backbone.vit.global_blocks=[2]",
             "model.backbone.pretrained=false", "model.co.aux_heads=[]",
             "model.transformer.num_encoder_layers=1", "model.transformer.num_decoder_layers=1"]  # fmt: skip


@pytest.fixture(scope="module")
def small_vit_model():
    job = load_config(str(REPO / "configs" / "finetune_lvis.yaml"), SMALL_VIT)
    assert job.train.layer_decay == 0.8 and job.train.lr_mults == {}  # the recipe's, not backbone x0.1
    with torch.device("meta"):
        return job, build_model(job.model)


def test_layer_decay_sets_each_groups_lr_mult(small_vit_model) -> None:
    job, model = small_vit_model
    opt = build_optimizer(model, job.train)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    mult = {n: group_of[id(p)]["lr_mult"] for n, p in params.items()}
    n = 3  # depth: blocks 0..2, embeddings at 0.8 ** 4, top block at 0.8
    assert mult["backbone.pos_embed"] == mult["backbone.patch_embed.proj.weight"] == pytest.approx(0.8 ** (n + 1))
    for i in range(n):
        assert mult[f"backbone.blocks.{i}.attn.q_proj.weight"] == pytest.approx(0.8 ** (n - i))
        assert mult[f"backbone.blocks.{i}.mlp.fc2.bias"] == pytest.approx(0.8 ** (n - i))
    for name in ("backbone.out_norm.weight", "neck.p2.1.weight", "head.cls_branches.0.weight",
                 "transformer.encoder.layers.0.self_attn.value_proj.weight"):  # fmt: skip
        assert mult[name] == 1.0
    assert len(opt.param_groups) == n + 2  # embeddings, 3 blocks, the rest
    for g in opt.param_groups:  # lr = base lr x multiplier, also after the schedule's factor
        assert g["lr"] == pytest.approx(job.train.lr * g["lr_mult"])
        assert g["weight_decay"] == job.train.weight_decay  # the authors decay every parameter, pos_embed too
    set_lr(opt, lr_factor(0, 0, job.train))
    assert {round(g["lr"] / g["initial_lr"], 9) for g in opt.param_groups} == {round(lr_factor(0, 0, job.train), 9)}


def test_layer_decay_multiplies_lr_mults_and_needs_the_vit(small_vit_model) -> None:
    _, model = small_vit_model
    opt = build_optimizer(model, TrainConfig(lr=1.0, layer_decay=0.5, lr_mults={"blocks.0.": 0.1}))
    mults = sorted(group["lr_mult"] for group in opt.param_groups)
    assert mults == pytest.approx(sorted([0.5**4, 0.5**3 * 0.1, 0.5**2, 0.5, 1.0]))
    no_decay = build_optimizer(model, TrainConfig(lr=1.0, layer_decay=0.0, lr_mults={}))
    assert [g["lr_mult"] for g in no_decay.param_groups] == [1.0]
    with torch.device("meta"):
        r18 = build_model(load_config(str(REPO / "configs" / "model" / "co_dino_tiny.yaml")).model)
    with pytest.raises(ValueError, match="train.layer_decay=0.8 needs the authors' ViT backbone"):
        build_optimizer(r18, TrainConfig(layer_decay=0.8))
