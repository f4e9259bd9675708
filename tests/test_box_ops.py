"""Box conversions, inverse_sigmoid, aligned IoU and the DeltaXYWH coder: hand values and torchvision."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import box_iou, generalized_box_iou

from pipeline.models.box_ops import (
    DeltaXYWHCoder,
    aligned_iou,
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    inverse_sigmoid,
)


def _random_xyxy(n: int, scale: float = 100.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * scale
    wh = (
        torch.rand(n, 2, generator=g) * scale * 0.45 + 0.05 * scale
    )  # aspect ratios stay within the 62.5x clip
    return torch.cat([xy, xy + wh], dim=1)


def test_box_conversions_hand_values_and_round_trip():
    cxcywh = torch.tensor([[0.5, 0.5, 0.2, 0.4], [10.0, 20.0, 4.0, 6.0]])
    xyxy = box_cxcywh_to_xyxy(cxcywh)
    assert torch.allclose(xyxy, torch.tensor([[0.4, 0.3, 0.6, 0.7], [8.0, 17.0, 12.0, 23.0]]))
    assert torch.allclose(box_xyxy_to_cxcywh(xyxy), cxcywh, atol=1e-6)
    batched = torch.rand(2, 5, 4)
    assert box_cxcywh_to_xyxy(batched).shape == (2, 5, 4)


def test_inverse_sigmoid_values_and_clamping():
    x = torch.tensor([0.5, 0.25, 0.9])
    assert torch.allclose(inverse_sigmoid(x), torch.logit(x), atol=1e-6)
    assert torch.allclose(inverse_sigmoid(x).sigmoid(), x, atol=1e-6)
    ends = inverse_sigmoid(torch.tensor([0.0, 1.0, -3.0, 7.0]))
    bound = math.log(1e-5 / 1.0)
    assert torch.allclose(ends, torch.tensor([bound, -bound, bound, -bound]), atol=1e-4)
    assert torch.allclose(inverse_sigmoid(torch.tensor([0.0]), eps=1e-3), torch.tensor([math.log(1e-3)]))


def test_aligned_iou_matches_torchvision_diagonal():
    a, b = _random_xyxy(50, seed=1), _random_xyxy(50, seed=2)
    b[:10] = a[:10] + 1.0  # some overlapping pairs
    assert torch.allclose(aligned_iou(a, b), torch.diagonal(box_iou(a, b)), atol=1e-6)
    assert torch.allclose(
        aligned_iou(a, b, mode="giou"), torch.diagonal(generalized_box_iou(a, b)), atol=1e-6
    )


def test_aligned_iou_eps_clamp_for_degenerate_boxes():
    point = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    assert aligned_iou(point, point).item() == 0.0  # 0 / max(0, eps), no NaN
    assert aligned_iou(point, point, mode="giou").item() == 0.0
    tiny = torch.tensor([[0.0, 0.0, 1e-4, 1e-4]])  # area 1e-8 < eps: union is clamped at 1e-6
    assert aligned_iou(tiny, tiny).item() == pytest.approx(1e-8 / 1e-6, rel=1e-3)
    with pytest.raises(ValueError, match="mode"):
        aligned_iou(point, point, mode="diou")


def test_coder_encode_hand_value():
    coder = DeltaXYWHCoder(stds=(0.1, 0.1, 0.2, 0.2))
    d = coder.encode(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[5.0, 5.0, 15.0, 25.0]]))
    assert torch.allclose(d, torch.tensor([[5.0, 10.0, 0.0, math.log(2.0) / 0.2]]), atol=1e-5)


def test_coder_decode_matches_mmdet_docstring_example():
    # the example in mmdet's delta2bbox docstring (means 0, stds 1, max_shape (32, 32))
    rois = torch.tensor(
        [[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [5.0, 5.0, 5.0, 5.0]]
    )
    deltas = torch.tensor(
        [[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 2.0, -1.0], [0.7, -1.9, -0.5, 0.3]]
    )
    out = DeltaXYWHCoder().decode(rois, deltas, max_shape=(32, 32))
    expected = torch.tensor(
        [
            [0.0, 0.0, 1.0, 1.0],
            [0.1409, 0.1409, 2.8591, 2.8591],
            [0.0, 0.3161, 4.1945, 0.6839],
            [5.0, 5.0, 5.0, 5.0],
        ]
    )
    assert torch.allclose(out, expected, atol=1e-4)


def test_coder_round_trip_with_stds():
    coder = DeltaXYWHCoder(means=(0.1, -0.1, 0.0, 0.05), stds=(0.1, 0.1, 0.2, 0.2))
    anchors, gt = _random_xyxy(64, seed=3), _random_xyxy(64, seed=4)
    back = coder.decode(anchors, coder.encode(anchors, gt))
    assert torch.allclose(back, gt, atol=1e-3)


def test_coder_decode_clips_ratio_and_border():
    coder = DeltaXYWHCoder()
    anchor = torch.tensor([[10.0, 10.0, 20.0, 20.0]])
    big = coder.decode(anchor, torch.tensor([[0.0, 0.0, 10.0, -10.0]]))
    w, h = (big[0, 2] - big[0, 0]).item(), (big[0, 3] - big[0, 1]).item()
    assert w == pytest.approx(10.0 / 0.016, rel=1e-4)  # exp(|log(16/1000)|) = 62.5
    assert h == pytest.approx(10.0 * 0.016, rel=1e-4)
    clipped = coder.decode(anchor, torch.tensor([[0.0, 0.0, 10.0, 10.0]]), max_shape=(30, 40))
    assert torch.equal(clipped, torch.tensor([[0.0, 0.0, 40.0, 30.0]]))  # x in [0, w], y in [0, h]
    no_clip = DeltaXYWHCoder(clip_border=False).decode(
        anchor, torch.tensor([[0.0, 0.0, 10.0, 10.0]]), (30, 40)
    )
    assert no_clip[0, 2].item() > 40.0


def test_coder_class_specific_and_batched_decode():
    coder = DeltaXYWHCoder(stds=(0.1, 0.1, 0.2, 0.2))
    anchors = _random_xyxy(6, seed=5)
    deltas = torch.randn(6, 12, generator=torch.Generator().manual_seed(6))  # 3 boxes per anchor
    out = coder.decode(anchors, deltas)
    assert out.shape == (6, 12)
    for k in range(3):
        assert torch.allclose(out[:, 4 * k : 4 * k + 4], coder.decode(anchors, deltas[:, 4 * k : 4 * k + 4]))
    batched = coder.decode(anchors.expand(2, 6, 4), deltas[:, :4].expand(2, 6, 4))
    assert torch.allclose(batched[1], coder.decode(anchors, deltas[:, :4]))
    assert coder.decode(anchors[:0], deltas[:0]).shape == (0, 12)
    with pytest.raises(ValueError, match="decode needs"):
        coder.decode(anchors, deltas[:, :5])
