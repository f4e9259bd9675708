"""FCOS auxiliary head: regression ranges, the centre-sampling assignment against a plain per-point loop,
unweighted losses with gradients, and the exported positives."""

from __future__ import annotations

import math

import torch

from pipeline.models.aux_heads.fcos import FCOSAssigner, FCOSHead, fcos_points, fcos_regress_ranges

SIZES = [(12, 16), (6, 8), (3, 4), (2, 2), (1, 1)]  # a 96 x 128 batch, strides 8..128
STRIDES = (8, 16, 32, 64, 128)
C, NC = 32, 3


def test_regress_ranges_are_the_originals_extended():
    r5 = fcos_regress_ranges(STRIDES)
    assert r5[:4] == ((-1, 64), (64, 128), (128, 256), (256, 512)) and r5[4][0] == 512 and r5[4][1] >= 1e8
    r6 = fcos_regress_ranges((4, *STRIDES))
    assert r6[0] == (-1, 32) and r6[1] == (32, 64) and r6[2:5] == r5[1:4]


def _loop_fcos(points, strides, ranges, gts, radius=1.5):
    """Per point, per GT: inside the clipped centre region, largest distance in range, smallest area wins."""
    out = []
    for (x, y), s, (lo, hi) in zip(points.tolist(), strides.tolist(), ranges.tolist()):
        best, best_area = -1, math.inf
        for g, (x1, y1, x2, y2) in enumerate(gts.tolist()):
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            cx0, cy0 = max(cx - s * radius, x1), max(cy - s * radius, y1)
            cx1, cy1 = min(cx + s * radius, x2), min(cy + s * radius, y2)
            inside = min(x - cx0, y - cy0, cx1 - x, cy1 - y) > 0
            largest = max(x - x1, y - y1, x2 - x, y2 - y)
            area = (x2 - x1) * (y2 - y1)
            if inside and lo <= largest <= hi and area < best_area:
                best, best_area = g, area
        out.append(best)
    return torch.tensor(out)


def test_assignment_matches_loop_reference_on_random_boxes():
    g = torch.Generator().manual_seed(0)
    pts = fcos_points(SIZES, STRIDES, torch.device("cpu"))
    points = torch.cat(pts)
    strides = torch.cat([p.new_full((len(p),), float(s)) for p, s in zip(pts, STRIDES)])
    ranges = torch.cat([p.new_tensor(r).expand(len(p), 2) for p, r in zip(pts, fcos_regress_ranges(STRIDES))])
    assert torch.equal(points[:2], torch.tensor([[4.0, 4.0], [12.0, 4.0]]))  # (x s + s // 2, y s + s // 2)
    assigner = FCOSAssigner(1.5)
    total = 0
    for trial in range(5):
        xy = torch.rand(3 + 2 * trial, 2, generator=g) * 100
        gts = torch.cat([xy, xy + 6 + torch.rand(len(xy), 2, generator=g) * 90], 1)
        gts[0] = gts[1]  # an exact area tie: the first GT wins
        labels = torch.randint(NC, (len(gts),), generator=g)
        lab, idx = assigner.assign(points, strides, ranges, gts, labels, NC)
        ref = _loop_fcos(points, strides, ranges, gts)
        assert torch.equal(idx, ref), (trial, (idx != ref).nonzero()[:5])
        assert torch.equal(lab[ref >= 0], labels[ref[ref >= 0]]) and (lab[ref < 0] == NC).all()
        assert not (idx == 1).any()
        total += int((ref >= 0).sum())
    assert total > 20  # the comparison covered positives on several levels


def test_forward_train_unweighted_losses_gradients_and_positives():
    torch.manual_seed(0)
    head = FCOSHead(NC, C, C, strides=STRIDES, loss_index=1, with_coord_feat=True)
    assert {k for k in head.state_dict() if "conv_" in k} >= {"conv_cls.weight", "conv_reg.weight",
                                                               "conv_centerness.weight"}
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(2, C, h, w, generator=g).requires_grad_() for h, w in SIZES]
    targets = [
        {"boxes": torch.tensor([[0.5, 0.5, 0.4, 0.5], [0.2, 0.3, 0.15, 0.2]]), "labels": torch.tensor([1, 2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]
    losses, pos = head.forward_train(feats, targets, torch.tensor([[96, 128], [96, 128]]))
    assert set(losses) == {"loss_cls1", "loss_bbox1", "loss_centerness1"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    n = sum(h * w for h, w in SIZES)
    assert pos.head == "fcos" and [c.shape for c in pos.coords] == [(n, 4)] * 2 and len(pos.feats) == 2
    torch.testing.assert_close(pos.coords[0][0], torch.tensor([-28.0, -28.0, 36.0, 36.0]))  # 8 x stride 8 square
    is_pos = pos.labels[0] < NC
    gt_xyxy = torch.tensor([[38.4, 24.0, 89.6, 72.0], [16.0, 19.2, 35.2, 38.4]])
    assert is_pos.sum() >= 2 and (pos.labels[1] == NC).all() and (pos.targets[1] == 0).all()
    assert (torch.cdist(pos.targets[0][is_pos], gt_xyxy).min(1).values < 1e-4).all()
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in head.parameters())
    assert head.conv_reg.weight.grad.abs().sum() > 0 and head.conv_centerness.weight.grad.abs().sum() > 0
