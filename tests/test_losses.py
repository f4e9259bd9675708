"""QFL / focal / L1 / GIoU against hand values and mmdet's formulas, and the one-to-one losses of the authors'
code on the golden case (matcher + QFL + L1 + GIoU end to end)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss

from pipeline.models.box_ops import aligned_iou, box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from pipeline.models.losses import (
    giou_loss,
    l1_loss,
    quality_focal_loss,
    reduce_mean,
    sigmoid_focal_loss,
    weight_reduce_loss,
)
from pipeline.models.query_head.matcher import HungarianMatcher

GOLDEN = Path("/work/shared/golden/co_dino_r50")
EPS32 = torch.finfo(torch.float32).eps


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _bce(x: float, t: float) -> float:
    return max(x, 0.0) - x * t + math.log1p(math.exp(-abs(x)))


def test_qfl_hand_value():
    logits = torch.tensor([[0.5, -1.0, 2.0], [0.0, 1.0, -2.0]])
    labels = torch.tensor([1, 3])  # row 0 positive of class 1, row 1 background (= C)
    scores = torch.tensor([0.7, 0.0])
    row0 = (
        _bce(0.5, 0) * _sig(0.5) ** 2
        + _bce(-1.0, 0.7) * abs(0.7 - _sig(-1.0)) ** 2
        + _bce(2.0, 0) * _sig(2.0) ** 2
    )
    row1 = sum(_bce(x, 0) * _sig(x) ** 2 for x in (0.0, 1.0, -2.0))
    out = quality_focal_loss(logits, labels, scores)
    assert out.shape == (2,)
    assert out.tolist() == pytest.approx([row0, row1], rel=1e-5)


def test_qfl_gradients_and_reduction():
    logits = torch.randn(6, 4, requires_grad=True)
    labels = torch.tensor([0, 4, 2, 4, 3, 1])
    scores = torch.rand(6)
    per_sample = quality_focal_loss(logits, labels, scores)
    loss = weight_reduce_loss(per_sample, torch.ones(6), avg_factor=4.0)
    assert loss.item() == pytest.approx(per_sample.sum().item() / (4.0 + EPS32), rel=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 0] != 0
    # with no positive, only the "towards 0" term is left
    none_pos = quality_focal_loss(logits.detach(), torch.full((6,), 4), scores)
    expected = (
        F.binary_cross_entropy_with_logits(logits, torch.zeros(6, 4), reduction="none")
        * logits.sigmoid() ** 2
    )
    assert torch.allclose(none_pos, expected.sum(1).detach(), atol=1e-6)
    with pytest.raises(ValueError, match="quality_focal_loss"):
        quality_focal_loss(logits, labels[:3], scores)


def _mmdet_py_sigmoid_focal(pred, target, alpha=0.25, gamma=2.0):
    p = pred.sigmoid()
    pt = (1 - p) * target + p * (1 - target)
    focal_weight = (alpha * target + (1 - alpha) * (1 - target)) * pt.pow(gamma)
    return F.binary_cross_entropy_with_logits(pred, target, reduction="none") * focal_weight


def test_sigmoid_focal_matches_mmdet_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 7, generator=g) * 2 - 3
    labels = torch.randint(0, 8, (200,), generator=g)  # 7 = background
    weight = torch.rand(200, generator=g)
    target = F.one_hot(labels, 8)[:, :7].float()
    ref = (_mmdet_py_sigmoid_focal(logits, target) * weight[:, None]).sum() / (37.0 + EPS32)
    assert sigmoid_focal_loss(logits, labels, weight, avg_factor=37.0).item() == pytest.approx(
        ref.item(), rel=1e-6
    )
    plain = sigmoid_focal_loss(logits, labels)
    assert plain.item() == pytest.approx(_mmdet_py_sigmoid_focal(logits, target).mean().item(), rel=1e-6)


def test_l1_loss_weights_and_empty():
    pred = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.5, 0.5]], requires_grad=True)
    target = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    weight = torch.tensor([[1.0] * 4, [0.0] * 4])
    loss = l1_loss(pred, target, weight, avg_factor=2.0)
    assert loss.item() == pytest.approx(1.0 / (2.0 + EPS32), rel=1e-6)
    loss.backward()
    assert pred.grad[1].abs().sum() == 0
    empty = l1_loss(torch.zeros(0, 4, requires_grad=True), torch.zeros(0, 4), avg_factor=1.0)
    assert empty.item() == 0.0 and empty.requires_grad


def test_giou_loss_matches_torchvision_on_valid_boxes_and_mmdet_weights():
    g = torch.Generator().manual_seed(1)
    p = torch.rand(30, 4, generator=g) * 100
    p[:, 2:] += p[:, :2] + 1
    t = p + torch.randn(30, 4, generator=g) * 5
    t[:, 2:] = torch.max(t[:, 2:], t[:, :2] + 1)
    ref = generalized_box_iou_loss(p, t, reduction="none")
    assert torch.allclose(1 - aligned_iou(p, t, mode="giou"), ref, atol=1e-6)
    w4 = torch.zeros(30, 4)
    w4[:10] = 1.0
    w4[10:12, :2] = 1.0  # (N, 4) weights are averaged over the last dim, as mmdet does
    expected = (ref[:10].sum() + 0.5 * ref[10:12].sum()) / (11.0 + EPS32)
    assert giou_loss(p, t, w4, avg_factor=11.0).item() == pytest.approx(expected.item(), rel=1e-5)
    zero = giou_loss(p.requires_grad_(True), t, torch.zeros(30), avg_factor=1.0)
    assert zero.item() == 0.0 and zero.requires_grad
    degenerate = giou_loss(torch.tensor([[1.0, 1.0, 1.0, 1.0]]), torch.tensor([[1.0, 1.0, 1.0, 1.0]]))
    assert degenerate.item() == 1.0  # finite, no NaN


def test_reduce_mean_without_distributed_is_identity():
    t = torch.tensor([3.0])
    assert reduce_mean(t) is t


@pytest.mark.skipif(not (GOLDEN / "expected.pt").exists(), reason="golden outputs not available")
def test_one_to_one_losses_match_authors_golden():
    """d0 and last-layer loss_cls / loss_bbox / loss_iou of the authors' Co-DINO from their logits and boxes:
    Hungarian matching, QFL with the detached IoU target, L1 and GIoU exactly as [spec 4.1]."""
    exp = torch.load(GOLDEN / "expected.pt", weights_only=False)
    inp = torch.load(GOLDEN / "inputs.pt", weights_only=False)
    golden = exp["train_losses_deterministic"]
    nc, matcher = 80, HungarianMatcher()

    def losses(logits: torch.Tensor, boxes: torch.Tensor) -> dict[str, float]:
        b_, q_ = logits.shape[:2]
        labels = torch.full((b_, q_), nc, dtype=torch.long)
        targets, weights, factors = torch.zeros(b_, q_, 4), torch.zeros(b_, q_, 4), []
        for b, (h, w) in enumerate(inp["img_shapes"]):
            factor = torch.tensor([w, h, w, h], dtype=torch.float32)
            gt = box_xyxy_to_cxcywh(inp["gt_bboxes_xyxy"][b] / factor)
            qi, gi = matcher.match(logits[b], boxes[b], inp["gt_labels"][b], gt, (h, w))
            labels[b, qi], targets[b, qi], weights[b, qi] = inp["gt_labels"][b][gi], gt[gi], 1.0
            factors.append(factor.expand(q_, 4))
        labels, targets, weights = labels.flatten(), targets.reshape(-1, 4), weights.reshape(-1, 4)
        pred, factor = boxes.reshape(-1, 4), torch.cat(factors)
        pos = (labels < nc).nonzero().squeeze(1)
        scores = torch.zeros(b_ * q_)
        scores[pos] = aligned_iou(box_cxcywh_to_xyxy(pred[pos]), box_cxcywh_to_xyxy(targets[pos]))
        num_pos = float(len(pos))
        qfl = quality_focal_loss(logits.reshape(-1, nc), labels, scores)
        return {
            "loss_cls": weight_reduce_loss(qfl, torch.ones(b_ * q_), avg_factor=max(num_pos, 1.0)).item(),
            "loss_bbox": 5.0 * l1_loss(pred, targets, weights, avg_factor=num_pos).item(),
            "loss_iou": 2.0
            * giou_loss(
                box_cxcywh_to_xyxy(pred) * factor, box_cxcywh_to_xyxy(targets) * factor, weights, num_pos
            ).item(),
        }

    for prefix, logit_idx, box_idx in (("d0.", 0, 0), ("", 1, 5)):
        got = losses(exp["cls_logits_first_last"][logit_idx], exp["all_bbox_preds"][box_idx])
        for name, value in got.items():
            assert value == pytest.approx(float(golden[prefix + name]), abs=1e-5), prefix + name
