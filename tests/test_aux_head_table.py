"""The table of auxiliary heads: validation, group order, K up to 6 with repeats (every trainable parameter gets
a gradient), the deployed parameters of any K equal K=0's, and the readers of the table (class remap keys)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.models import build_model
from pipeline.models.aux_heads.table import AUX_HEADS, class_param_keys, group_order

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/model/co_dino_tiny.yaml")


def tiny(heads: str, *extra: str):
    return load_config(TINY, [f"model.co.aux_heads={heads}", "model.num_classes=4", *extra]).model


def _batch():
    g = torch.Generator().manual_seed(0)
    h, w = 96, 128
    images = torch.randn(2, 3, h, w, generator=g)
    targets = [
        {"boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4], [0.25, 0.3, 0.2, 0.2]]), "labels": torch.tensor([1, 3]),
         "size": torch.tensor([h, w])},
        {"boxes": torch.tensor([[0.6, 0.4, 0.25, 0.3]]), "labels": torch.tensor([0]), "size": torch.tensor([h, w])},
    ]
    return images, torch.zeros(2, h, w, dtype=torch.bool), targets


def test_unknown_head_is_a_one_line_error_listing_the_known_heads():
    with pytest.raises(ConfigError) as e:
        tiny("[atss,yolo]")
    msg = str(e.value)
    assert "\n" not in msg and "'yolo'" in msg and all(name in msg for name in AUX_HEADS)
    with pytest.raises(ConfigError, match="at most 6"):
        tiny("[atss,atss,atss,atss,atss,atss,atss]")


def test_group_order_roi_heads_first_repeats_kept():
    assert group_order(["atss", "faster_rcnn"]) == ["faster_rcnn", "atss"]
    assert group_order(["atss", "faster_rcnn", "atss"]) == ["faster_rcnn", "atss", "atss"]


def test_class_remap_keys_come_from_the_table():
    from pipeline.train.init import CLASS_PARAM_KEYS

    assert {"cls_branches", "label_embedding", "atss_cls", "fc_cls", "fc_reg"} <= set(CLASS_PARAM_KEYS)
    assert set(class_param_keys()) <= set(CLASS_PARAM_KEYS)
    for name, spec in AUX_HEADS.items():  # every row's class parameters exist in its head, with nc rows
        model = build_model(tiny(f"[{name}]"))
        keys = [k for k in model.state_dict() if k.startswith("aux_heads.0.")]
        for sub in spec.class_params:
            hits = [k for k in keys if sub in k]
            assert hits, f"{name}: no parameter named like {sub!r}"


@pytest.mark.parametrize(
    ("heads", "config"),
    [("[atss,faster_rcnn,retinanet,fcos,gfl,atss]", TINY),  # K = 6, every head, a repeat
     ("[fcos,gfl,retinanet,paa]", str(REPO / "configs/model/co_deformable_detr_tiny.yaml"))],  # coordinate features
)
def test_k_heads_train_step_every_parameter_gets_a_gradient_and_deploys_as_k0(heads, config):
    torch.manual_seed(0)
    cfg = load_config(config, [f"model.co.aux_heads={heads}", "model.num_classes=4"]).model
    model = build_model(cfg).train()
    k = len(cfg.co.aux_heads)
    assert len(model.aux_heads) == k and len(model.aux_query_proj.aux_pos_trans) == k
    assert [h.name for h in model.aux_heads] == group_order(cfg.co.aux_heads)  # RoI heads first
    losses = model(*_batch())
    for i in range(k):
        assert {f"loss_cls{i}", f"loss_bbox{i}", f"loss_cls_aux{i}", f"d0.loss_iou_aux{i}"} <= set(losses)
    total = sum(v for n, v in losses.items() if "loss" in n)
    assert torch.isfinite(total)
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:8]
    k0 = build_model(load_config(config, ["model.co.aux_heads=[]", "model.num_classes=4"]).model)
    deployed = model.inference_state_dict()
    assert {n: t.shape for n, t in deployed.items()} == {n: t.shape for n, t in k0.state_dict().items()}
    k0.load_state_dict(deployed)
