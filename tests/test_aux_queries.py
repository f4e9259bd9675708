"""Customized positive queries: group building, query projection, aux decoder losses, loss-weight table."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_iou

from pipeline.models.aux_heads.base import AuxPositives
from pipeline.models.aux_queries.groups import AuxQueryProjection, aux_decoder_losses, build_aux_groups
from pipeline.models.box_ops import box_cxcywh_to_xyxy, inverse_sigmoid
from pipeline.models.config import CoConfig, ModelConfig
from pipeline.models.layers.position_encoding import get_proposal_pos_embed
from pipeline.models.loss_weights import aux_decoder_weights, loss_weights, weigh

NC = 5


def _positives(num_pos: list[int], n: int = 60, seed: int = 0, head: str = "atss") -> AuxPositives:
    """Per image n coordinates in a 100 x 200 (h x w) image; the first num_pos[i] are positives."""
    g = torch.Generator().manual_seed(seed)
    coords, labels, targets = [], [], []
    for k in num_pos:
        xy = torch.rand(n, 2, generator=g) * torch.tensor([150.0, 70.0])
        c = torch.cat([xy, xy + 5 + torch.rand(n, 2, generator=g) * 40], 1)
        lab = torch.full((n,), NC, dtype=torch.long)
        lab[:k] = torch.randint(NC, (k,), generator=g)
        t = torch.zeros(n, 4)
        t[:k] = c[:k] + 2.0
        coords.append(c)
        labels.append(lab)
        targets.append(t)
    return AuxPositives(head=head, coords=coords, labels=labels, targets=targets, feats=None)


SIZES = torch.tensor([[100, 200], [100, 200]])


@pytest.mark.parametrize(("num_pos", "max_pos", "m"), [([3, 5], 300, 9), ([12, 4], 300, 12), ([40, 2], 25, 25)])
def test_group_size_is_clamped_max_positives(num_pos, max_pos, m):
    group = build_aux_groups(_positives(num_pos), SIZES, NC, min_pos=9, max_pos=max_pos)
    assert group.boxes.shape == (2, m, 4) and group.targets.shape == (2, m, 4)
    assert group.labels.shape == group.label_weights.shape == group.box_weights.shape == (2, m)
    for i, k in enumerate(num_pos):
        kept = min(k, m)
        assert (group.labels[i, :kept] < NC).all() and (group.labels[i, kept:] == NC).all()
        assert group.box_weights[i].tolist() == [1.0] * kept + [0.0] * (m - kept)
        assert (group.label_weights[i] == 1).all()


def test_all_positives_kept_and_coordinates_normalised():
    pos = _positives([7, 3])
    group = build_aux_groups(pos, SIZES, NC, generator=torch.Generator().manual_seed(1))
    scale = torch.tensor([200.0, 100.0, 200.0, 100.0])
    for i, k in enumerate([7, 3]):
        xyxy = box_cxcywh_to_xyxy(group.boxes[i]) * scale
        # the positives are exactly the head's positives (as a set), with their labels and targets
        d = torch.cdist(xyxy[:k], pos.coords[i][:k], compute_mode="donot_use_mm_for_euclid_dist")
        assert (d.min(1).values < 1e-3).all() and (d.min(0).values < 1e-3).all()
        j = d.argmin(1)
        assert torch.equal(group.labels[i, :k], pos.labels[i][:k][j])
        tgt = box_cxcywh_to_xyxy(group.targets[i, :k]) * scale
        assert torch.allclose(tgt, pos.targets[i][:k][j], atol=1e-3)
        # the padding comes from the head's negatives
        dn = torch.cdist(xyxy[k:], pos.coords[i][k:], compute_mode="donot_use_mm_for_euclid_dist")
        assert (dn.min(1).values < 1e-3).all()
        assert len(set(dn.argmin(1).tolist())) == 9 - k  # distinct negatives


def test_coordinates_are_not_clamped():
    pos = AuxPositives(
        head="atss",
        coords=[torch.tensor([[-16.0, -16.0, 16.0, 16.0]] * 10)],
        labels=[torch.tensor([0] + [NC] * 9)],
        targets=[torch.tensor([[0.0, 0.0, 10.0, 10.0]] + [[0.0] * 4] * 9)],
    )
    group = build_aux_groups(pos, torch.tensor([[20, 40]]), NC)
    assert torch.allclose(group.boxes[0, 0], torch.tensor([0.0, 0.0, 0.8, 1.6]))  # cx 0/40, w 32/40, h 32/20


def test_image_with_zero_positives_gets_only_negatives():
    group = build_aux_groups(_positives([0, 11]), SIZES, NC)
    assert group.boxes.shape[1] == 11
    assert (group.labels[0] == NC).all() and (group.box_weights[0] == 0).all() and (group.label_weights[0] == 1).all()
    assert group.box_weights[1].sum() == 11


def test_batch_without_any_positive_or_negative_fills_with_zero_weight_slots():
    group = build_aux_groups(_positives([0, 0]), SIZES, NC)
    assert group.boxes.shape == (2, 9, 4) and group.box_weights.sum() == 0
    few = AuxPositives("rcnn", [torch.tensor([[0.0, 0.0, 10.0, 10.0]])], [torch.tensor([2])], [torch.zeros(1, 4)])
    g2 = build_aux_groups(few, torch.tensor([[20, 20]]), NC)  # 1 positive, no negative at all
    assert g2.label_weights[0].tolist() == [1.0] + [0.0] * 8 and g2.labels[0, 1:].eq(NC).all()


def test_random_subset_is_reproducible_with_generator():
    pos = _positives([40, 2])
    a = build_aux_groups(pos, SIZES, NC, max_pos=20, generator=torch.Generator().manual_seed(3))
    b = build_aux_groups(pos, SIZES, NC, max_pos=20, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.boxes, b.boxes) and a.boxes.shape[1] == 20


def test_query_projection_names_shapes_and_embedding():
    proj = AuxQueryProjection(num_heads=2, embed_dims=256)
    assert {k: tuple(v.shape) for k, v in proj.state_dict().items()} == {
        "aux_pos_trans.0.weight": (256, 512),
        "aux_pos_trans.0.bias": (256,),
        "aux_pos_trans.1.weight": (256, 512),
        "aux_pos_trans.1.bias": (256,),
        "aux_pos_trans_norm.0.weight": (256,),
        "aux_pos_trans_norm.0.bias": (256,),
        "aux_pos_trans_norm.1.weight": (256,),
        "aux_pos_trans_norm.1.bias": (256,),
    }
    boxes = torch.rand(2, 9, 4)
    q = proj(boxes, 1)
    assert q.shape == (2, 9, 256)
    pe = get_proposal_pos_embed(inverse_sigmoid(boxes))
    ref = torch.nn.functional.layer_norm(pe @ proj.aux_pos_trans[1].weight.T + proj.aux_pos_trans[1].bias, (256,))
    assert torch.allclose(q, ref, atol=1e-5)
    assert not torch.allclose(proj(boxes, 0), q)
    with pytest.raises(ValueError, match="head_idx"):
        proj(boxes, 2)


def _outputs(group, seed=0, layers=6):
    g = torch.Generator().manual_seed(seed)
    b, m = group.labels.shape
    logits = torch.randn(layers, b, m, NC, generator=g).requires_grad_()
    boxes = (group.targets[None] + 0.02 * torch.randn(layers, b, m, 4, generator=g)).clamp(0.01, 0.99)
    return logits, boxes.requires_grad_()


def test_aux_decoder_losses_names_and_values():
    group = build_aux_groups(_positives([6, 3]), SIZES, NC)
    logits, boxes = _outputs(group)
    out = aux_decoder_losses(logits, boxes, group, SIZES, head_index=1)
    names = {f"{p}loss_{t}_aux1" for p in ["", "d0.", "d1.", "d2.", "d3.", "d4."] for t in ("cls", "bbox", "iou")}
    assert set(out) == names
    assert all(torch.isfinite(v) and v > 0 for v in out.values())
    # L1: |pred - target| on positives only, / #positives (unweighted; x 5 with the table's weights)
    pos = group.box_weights.bool()
    l1 = (boxes[-1][pos] - group.targets[pos]).abs().sum() / pos.sum()
    torch.testing.assert_close(out["loss_bbox_aux1"], l1, rtol=1e-5, atol=1e-6)
    weighted = aux_decoder_losses(logits, boxes, group, SIZES, aux_decoder_weights(ModelConfig()), head_index=1)
    torch.testing.assert_close(weighted["d2.loss_bbox_aux1"], 5 * out["d2.loss_bbox_aux1"])
    (sum(out.values())).backward()
    assert logits.grad.abs().sum() > 0 and boxes.grad.abs().sum() > 0


def test_aux_decoder_qfl_targets_iou_of_detached_prediction():
    group = build_aux_groups(_positives([4, 0]), SIZES, NC)
    logits, boxes = _outputs(group, layers=1)
    out = aux_decoder_losses(logits, boxes, group, SIZES)
    # reference QFL with score = IoU(pred, target) on positives, normalised by #positives
    lg, lab = logits[0].reshape(-1, NC), group.labels.reshape(-1)
    p = lg.sigmoid()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(lg, torch.zeros_like(lg), reduction="none") * p**2
    pb = box_cxcywh_to_xyxy(boxes[0].reshape(-1, 4))
    tb = box_cxcywh_to_xyxy(group.targets.reshape(-1, 4))
    for r in range(lab.numel()):
        if lab[r] < NC:
            s = box_iou(pb[r : r + 1], tb[r : r + 1])[0, 0].detach()
            c = lab[r]
            loss[r, c] = torch.nn.functional.binary_cross_entropy_with_logits(lg[r, c], s) * (s - p[r, c]).abs() ** 2
    torch.testing.assert_close(out["loss_cls_aux0"], loss.sum() / 4, rtol=1e-5, atol=1e-6)
    # the IoU target is detached: the class loss gives no gradient to the boxes
    out["loss_cls_aux0"].backward()
    assert boxes.grad is None or boxes.grad.abs().sum() == 0


def test_aux_decoder_losses_without_positives_are_zero_box_losses():
    group = build_aux_groups(_positives([0, 0]), SIZES, NC)
    logits, boxes = _outputs(group, layers=2)
    out = aux_decoder_losses(logits, boxes, group, SIZES)
    assert out["loss_bbox_aux0"] == 0 and out["loss_iou_aux0"] == 0 and out["loss_cls_aux0"] > 0


def test_lambda1_scales_aux_decoder_losses():
    group = build_aux_groups(_positives([5, 2]), SIZES, NC)
    logits, boxes = _outputs(group, layers=1)
    w1 = aux_decoder_weights(ModelConfig(co=CoConfig(lambda1=1.0)))
    base = aux_decoder_losses(logits, boxes, group, SIZES, weights=w1)
    w_half = aux_decoder_weights(ModelConfig(co=CoConfig(lambda1=0.5)))
    half = aux_decoder_losses(logits, boxes, group, SIZES, weights=w_half)
    for k in base:
        torch.testing.assert_close(half[k], 0.5 * base[k])


def test_loss_weight_table_at_defaults_equals_authors():
    w = loss_weights(ModelConfig())  # K = 2: Faster R-CNN is group 0, ATSS group 1
    assert (w["loss_cls1"], w["loss_bbox1"], w["loss_centerness1"]) == (12, 24, 12)
    assert (w["loss_rpn_cls"], w["loss_rpn_bbox"], w["loss_cls0"], w["loss_bbox0"]) == (12, 12, 12, 120)
    for k in (0, 1):
        for p in ("", "d0.", "d4."):
            assert (w[f"{p}loss_cls_aux{k}"], w[f"{p}loss_bbox_aux{k}"], w[f"{p}loss_iou_aux{k}"]) == (1, 5, 2)
    assert len(w) == 7 + 2 * 6 * 3
    w2 = loss_weights(ModelConfig(co=CoConfig(lambda1=2.0, lambda2=1.0)))
    assert (w2["loss_bbox1"], w2["loss_bbox0"], w2["loss_bbox_aux0"]) == (12, 60, 10)
    # the config's base weights are live
    from pipeline.config import replace

    w3 = loss_weights(replace(ModelConfig(), **{"co.atss.bbox_weight": 1.0, "co.faster_rcnn.roi_bbox_weight": 5.0}))
    assert (w3["loss_bbox1"], w3["loss_bbox0"]) == (12, 60)
    with pytest.raises(ValueError, match="lambda"):
        CoConfig(lambda1=-1)
    # weigh: every loss term must be in the table; metrics pass through
    assert weigh({"loss_cls1": 2.0, "acc0": 50.0}, w) == {"loss_cls1": 24.0, "acc0": 50.0}
    with pytest.raises(KeyError, match="loss_foo"):
        weigh({"loss_foo": 1.0}, w)
