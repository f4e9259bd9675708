"""Co-Deformable-DETR (CO_DETR_SPEC.md 1.2, 3.2, 4.2, 5.3) on the tiny config: K = 0, 1, 2 training steps with the
expected loss names and a gradient for every trainable parameter, top-100 inference without NMS, the (2, 1)
`head_pos_embed`, the coordinate-feature term of the aux queries, deployed K=2 == K=0 parameters, the focal loss
on a hand-computed case, and the authors' R50 recipe building with its parameter counts.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_co_deformable.py
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config, replace
from pipeline.models import build_model
from pipeline.models.config import ModelConfig

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/model/co_deformable_detr_tiny.yaml")
R50 = str(REPO / "configs/model/co_deformable_detr_r50.yaml")
HEADS = {0: "[]", 1: "[atss]", 2: "[atss,faster_rcnn]"}
MAIN = {f"{p}loss_{t}" for p in ("", "d0.") for t in ("cls", "bbox", "iou")} | {
    f"enc_loss_{t}" for t in ("cls", "bbox", "iou")
}


def tiny(k: int) -> ModelConfig:
    return load_config(TINY, [f"model.co.aux_heads={HEADS[k]}", "model.num_classes=5"]).model


def batch():
    g = torch.Generator().manual_seed(0)
    h, w = 128, 160
    images = torch.randn(2, 3, h, w, generator=g)
    masks = torch.zeros(2, h, w, dtype=torch.bool)
    masks[1, :, 144:] = True  # second image is 128 x 144
    targets = [
        {"boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4], [0.25, 0.3, 0.2, 0.2]]), "labels": torch.tensor([1, 3])},
        {"boxes": torch.tensor([[0.6, 0.4, 0.25, 0.3]]), "labels": torch.tensor([0])},
    ]
    return images, masks, targets


# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 1, 2])
def test_train_step_losses_and_gradients(k):
    torch.manual_seed(0)
    model = build_model(tiny(k)).train()
    assert model.denoising is None and not hasattr(model.transformer, "query_embed")
    assert model.transformer.decoder.ref_point_head is None
    assert isinstance(model.transformer.decoder.norm, torch.nn.Identity)
    losses = model(*batch())
    expected = set(MAIN)
    for i in range(k):
        expected |= {f"{p}loss_{t}_aux{i}" for p in ("", "d0.") for t in ("cls", "bbox", "iou")}
    if k >= 1:  # ATSS is the last group (RoI heads first)
        expected |= {f"loss_cls{k - 1}", f"loss_bbox{k - 1}", f"loss_centerness{k - 1}"}
    if k == 2:
        expected |= {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls0", "loss_bbox0", "acc0"}
    assert set(losses) == expected
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    total = sum(v for n, v in losses.items() if "loss" in n)
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"K={k}: parameters without gradient: {missing[:8]}"
    if k:
        assert model.aux_query_proj.head_pos_embed.weight.shape == (k, 1)
        assert model.aux_query_proj.head_pos_embed.weight.grad.abs().sum() > 0
        assert all(p.grad.abs().sum() > 0 for p in model.aux_query_proj.pos_feats_trans.parameters())


def test_eval_top100_without_nms():
    from pipeline.models.query_head.postprocess import detr_topk

    torch.manual_seed(0)
    model = build_model(tiny(2)).eval()
    images, masks, _ = batch()
    dets = model(images, masks)
    sizes = model.image_sizes(images, masks, None, None)
    with torch.no_grad():
        out = model.run(images, sizes)
    assert out.logits.shape[2] == 100 and model.test_cfg.nms == "none"
    for i, det in enumerate(dets):
        assert det["boxes"].shape == (100, 4) and det["scores"].shape == (100,) and det["labels"].shape == (100,)
        # exactly the top-100 of the Q x nc sigmoid scores: nothing removed by NMS
        ref = detr_topk(out.logits[-1, i], out.boxes[-1, i], sizes[i], 100)
        torch.testing.assert_close(det["scores"], out.logits[-1, i].sigmoid().flatten().topk(100).values)
        torch.testing.assert_close(det["boxes"], ref["boxes"])
        assert torch.equal(det["labels"], ref["labels"])


def test_queries_selected_by_first_class_logit_and_encoder_sees_all_tokens():
    from pipeline.models.transformer.co_deformable import select_topk_first_class

    logits = torch.tensor([[[0.0, 9.0], [3.0, -1.0], [1.0, 0.0], [2.0, 5.0]]])  # max-class order would be 0, 3
    box_logits = torch.randn(1, 4, 4, requires_grad=True)
    sel = select_topk_first_class(logits, box_logits, 2)
    assert sel.indices.tolist() == [[1, 3]]
    assert sel.logits.shape == (1, 4, 2) and sel.boxes.shape == (1, 4, 4)  # every token: encoder loss input
    assert not sel.ref_logits.requires_grad and torch.equal(sel.ref_logits, box_logits[:, [1, 3]].detach())

    torch.manual_seed(0)
    model = build_model(tiny(0)).eval()
    images, masks, _ = batch()
    with torch.no_grad():
        out = model.run(images, model.image_sizes(images, masks, None, None))
    num_tokens = out.enc.memory.shape[1]
    assert out.selection.logits.shape == (2, num_tokens, 5) and out.selection.indices.shape == (2, 100)


def test_aux_query_feature_term_and_head_pos_embed():
    from pipeline.models.aux_queries.deformable_projection import DeformableAuxQueryProjection

    torch.manual_seed(0)
    proj = DeformableAuxQueryProjection(num_heads=2, embed_dims=32)
    assert proj.head_pos_embed.weight.shape == (2, 1)  # the authors' bug, kept
    assert proj.aux_pos_trans[0].weight.shape == (64, 64) and proj.pos_feats_trans[1].weight.shape == (32, 32)
    boxes = torch.rand(2, 7, 4) * 0.8 + 0.1
    zero = torch.zeros(2, 7, 32)
    feats = torch.randn(2, 7, 32)
    q0, pos0 = proj(boxes, zero, 0)
    q1, pos1 = proj(boxes, feats, 0)
    assert q0.shape == (2, 7, 32) and pos0.shape == (2, 7, 32)
    assert not torch.allclose(q0, q1)  # the feature term changes the content query ...
    torch.testing.assert_close(pos0, pos1)  # ... not the positional one
    with torch.no_grad():
        proj.head_pos_embed.weight[0] += 1.5
    _, pos2 = proj(boxes, zero, 0)
    torch.testing.assert_close(pos2 - pos0, torch.full_like(pos0, 1.5))  # one scalar broadcast over channels
    _, pos_head1 = proj(boxes, zero, 1)
    assert not torch.allclose(pos_head1, pos0)  # per-head modules


def test_atss_exports_anchor_features_in_anchor_order():
    from pipeline.models.aux_heads.atss import ATSSHead

    torch.manual_seed(0)
    head = ATSSHead(num_classes=3, in_channels=32, feat_channels=32, strides=(8, 16), with_coord_feat=True)
    feats = [torch.randn(2, 32, 8, 10), torch.randn(2, 32, 4, 5)]
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4]]), "labels": torch.tensor([1])}] * 2
    _, pos = head.forward_train(feats, targets, torch.tensor([[64, 80], [64, 80]]))
    assert pos.feats is not None and [tuple(f.shape) for f in pos.feats] == [(100, 32), (100, 32)]
    # anchor 8 * 10 + 1 * 5 + 2 = 87 is level 1, row 1, column 2; its centre is (2 * 16, 1 * 16) (mmdet offset 0)
    torch.testing.assert_close(pos.feats[1][87], feats[1][1, :, 1, 2])
    anchor = pos.coords[1][87]
    torch.testing.assert_close((anchor[:2] + anchor[2:]) / 2, torch.tensor([32.0, 16.0]))


def test_focal_loss_hand_computed():
    from pipeline.models.query_head.dino_head import DINOHead

    head = DINOHead(num_classes=2, embed_dims=8, num_decoder_layers=1, cls_weight=2.0, cls_loss="focal")
    logits = torch.tensor([[[0.0, 2.0]]])  # one query, label 1
    p = 1 / (1 + math.exp(-2.0))
    # class 0 (target 0): (1 - alpha) p0^2 (-log(1 - p0)), p0 = 0.5; class 1 (target 1): alpha (1 - p)^2 (-log p)
    expected = 0.75 * 0.25 * math.log(2) + 0.25 * (1 - p) ** 2 * -math.log(p)  # 0.130416, avg factor 1
    box = torch.tensor([[[0.5, 0.5, 0.2, 0.2]]])
    loss_cls, loss_bbox, loss_iou = head.assigned_loss(
        logits, box, torch.tensor([[1]]), torch.ones(1, 1), box, torch.ones(1, 1, 4), torch.tensor([[100, 100]])
    )
    assert abs(float(loss_cls) - 2.0 * expected) < 1e-6
    assert float(loss_bbox) == 0 and abs(float(loss_iou)) < 1e-6

    from pipeline.models.aux_queries.groups import AuxGroup, aux_decoder_losses
    from pipeline.models.loss_weights import AuxDecoderWeights

    group = AuxGroup(boxes=box, labels=torch.tensor([[1]]), targets=box, label_weights=torch.ones(1, 1),
                     box_weights=torch.ones(1, 1), head="atss")  # fmt: skip
    aux = aux_decoder_losses(logits[None], box[None], group, torch.tensor([[100, 100]]),
                             AuxDecoderWeights(cls=2.0, bbox=5.0, iou=2.0), focal=(0.25, 2.0))  # fmt: skip
    assert abs(float(aux["loss_cls_aux0"]) - 2.0 * expected) < 1e-6


def test_deployed_k2_equals_k0_parameters():
    k0 = build_model(tiny(0))
    k2 = build_model(tiny(2))
    deployed = k2.inference_state_dict()
    assert {n: tuple(t.shape) for n, t in deployed.items()} == {n: tuple(t.shape) for n, t in k0.state_dict().items()}
    assert not any(k.startswith(("aux_heads.", "adapter.", "aux_query_proj.")) for k in deployed)
    assert any("head_pos_embed" in k for k in k2.state_dict()) and not any("head_pos_embed" in k for k in deployed)
    k0.load_state_dict(deployed)  # strict: a K=2 export loads into the K=0 model


def test_lr_mults_and_config_validation():
    from pipeline.train.optim import param_groups

    job = load_config(TINY)
    assert job.train.lr_mults == {"backbone": 0.1, "sampling_offsets": 0.1, "reference_points": 0.1}
    model = build_model(replace(job.model, **{"co.aux_heads": ()}))
    groups = {g["lr_mult"]: g["params"] for g in param_groups(model, 1.0, 0.0, job.train.lr_mults)}
    offsets = {id(p) for n, p in model.named_parameters() if "sampling_offsets" in n}
    assert offsets and offsets <= {id(p) for p in groups[0.1]}
    with pytest.raises(ValueError, match="model.arch"):
        ModelConfig(arch="co_detr")
    with pytest.raises(ValueError, match="dn.enabled"):
        ModelConfig(arch="co_deformable_detr")


def test_r50_recipe_builds_with_the_expected_parameter_counts():
    """Counted as jobs/model_info.py does (frozen-BN affine buffers included), on the meta device."""
    job = load_config(R50, ["model.backbone.pretrained=false"])
    assert job.train.lr_mults == {"backbone": 0.1, "sampling_offsets": 0.1, "reference_points": 0.1}
    cfg = job.model
    assert (cfg.arch, cfg.transformer.num_levels, cfg.transformer.num_queries, cfg.dn.enabled) == (
        "co_deformable_detr", 4, 300, False)  # fmt: skip
    with torch.device("meta"):
        model = build_model(cfg)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    sizes.update({n: b.numel() for n, b in model.named_buffers()
                  if n.endswith(("weight", "bias")) and not n.endswith(("running_mean", "running_var"))})  # fmt: skip
    deployed = set(model.inference_state_dict())
    total, inference = sum(sizes.values()), sum(n for k, n in sizes.items() if k in deployed)
    assert (total, inference) == (65_129_894, 47_594_380)
    sd = model.state_dict()
    assert sd["transformer.level_embeds"].shape == (4, 256) and sd["transformer.query_embedding.weight"].shape == (
        300, 256)  # fmt: skip
    assert sd["transformer.pos_trans.weight"].shape == (512, 512) and sd["transformer.pos_trans_norm.weight"].shape == (
        512,)  # fmt: skip
    assert sd["aux_query_proj.head_pos_embed.weight"].shape == (2, 1)
    assert sd["aux_query_proj.aux_pos_trans.1.weight"].shape == (512, 512)
    assert sd["transformer.encoder.layers.0.self_attn.sampling_offsets.weight"].shape == (256, 256)
    assert sd["transformer.decoder.layers.0.cross_attn.attention_weights.weight"].shape == (128, 256)
    assert not any(k.startswith(("transformer.decoder.norm", "transformer.decoder.ref_point_head", "denoising"))
                   for k in sd)  # fmt: skip
    maps = model.adapter(torch.zeros(1, 22, 256, device="meta"), [(4, 4), (2, 2), (1, 1), (1, 1)])
    assert len(maps) == 5 and model.aux_heads[1].strides == (8, 16, 32, 64, 128)  # adapter: 4 memory maps + 1
    assert model.aux_heads[0].roi_head.finest_scale == 112 and model.aux_heads[0].roi_head.strides == (8, 16, 32, 64)
    print(f"Co-Deformable-DETR R50: total {total:,d}, inference {inference:,d}")


def test_model_info_reports_equal_inference_params():
    out = {}
    for k in (0, 2):
        res = subprocess.run([sys.executable, str(REPO / "jobs/model_info.py"), "--config", TINY,
                              "--set", f"model.co.aux_heads={HEADS[k]}"], capture_output=True, text=True, check=True)
        out[k] = json.loads(res.stdout.strip().splitlines()[-1])
    assert out[0]["inference_params"] == out[2]["inference_params"]
    assert out[2]["total_params"] > out[0]["total_params"] == out[0]["inference_params"]
