"""Collaborative training on the tiny config: K = 0, 1, 2 give the expected named losses, every trainable
parameter receives a gradient, and the deployed K=2 model holds exactly the K=0 parameters."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.models import build_model

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/model/co_dino_tiny.yaml")
HEADS = {0: "[]", 1: "[atss]", 2: "[atss,faster_rcnn]"}


def tiny(k: int):
    return load_config(TINY, [f"model.co.aux_heads={HEADS[k]}", "model.num_classes=5"]).model


def batch():
    g = torch.Generator().manual_seed(0)
    h, w = 128, 160
    images = torch.randn(2, 3, h, w, generator=g)
    masks = torch.zeros(2, h, w, dtype=torch.bool)
    masks[1, :, 144:] = True  # second image is 128 x 144
    targets = [
        {"boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4], [0.25, 0.3, 0.2, 0.2]]), "labels": torch.tensor([1, 3]),
         "size": torch.tensor([h, w]), "orig_size": torch.tensor([h, w])},
        {"boxes": torch.tensor([[0.6, 0.4, 0.25, 0.3]]), "labels": torch.tensor([0]),
         "size": torch.tensor([h, 144]), "orig_size": torch.tensor([h, 144])},
    ]
    return images, masks, targets


@pytest.mark.parametrize("k", [0, 1, 2])
def test_train_step_losses_and_gradients(k):
    torch.manual_seed(0)
    model = build_model(tiny(k)).train()
    losses = model(*batch())
    names = set(losses)
    main = {"loss_cls", "loss_bbox", "loss_iou", "enc_loss_cls", "d0.loss_cls", "dn_loss_cls"}
    assert main <= names
    aux = {i: {f"loss_cls_aux{i}", f"loss_bbox_aux{i}", f"loss_iou_aux{i}", f"d0.loss_cls_aux{i}"} for i in range(k)}
    for i in range(k):
        assert aux[i] <= names, f"K={k}: missing aux decoder losses of group {i}"
    assert not any("aux" in n for n in names if not any(n.endswith(f"aux{i}") for i in range(k)))
    if k >= 1:  # ATSS is the last group (authors' order: RoI heads first, then dense heads)
        assert {f"loss_cls{k - 1}", f"loss_bbox{k - 1}", f"loss_centerness{k - 1}"} <= names
    if k == 2:
        assert {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls0", "loss_bbox0", "acc0"} <= names
    total = sum(v for n, v in losses.items() if "loss" in n)
    assert torch.isfinite(total)
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None)]
    assert not missing, f"K={k}: parameters without gradient: {missing[:8]}"


def test_deployed_k2_equals_k0_parameters():
    k0 = build_model(tiny(0))
    k2 = build_model(tiny(2))
    deployed = k2.inference_state_dict()
    assert {n: tuple(t.shape) for n, t in deployed.items()} == {n: tuple(t.shape) for n, t in k0.state_dict().items()}
    k0.load_state_dict(deployed)  # strict: a K=2 export loads into the K=0 model


def test_model_info_reports_equal_inference_params():
    out = {}
    for k in (0, 2):
        res = subprocess.run([sys.executable, str(REPO / "jobs/model_info.py"), "--config", TINY,
                              "--set", f"model.co.aux_heads={HEADS[k]}"], capture_output=True, text=True, check=True)
        out[k] = json.loads(res.stdout.strip().splitlines()[-1])
    assert out[0]["inference_params"] == out[2]["inference_params"]
    assert out[2]["total_params"] > out[0]["total_params"] == out[0]["inference_params"]
