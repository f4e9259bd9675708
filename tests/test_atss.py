"""ATSS auxiliary head: anchors (mmdet, offset 0), ATSSAssigner, adapter, head losses and exported positives."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.models.aux_heads.adapter import MultiScaleAdapter
from pipeline.models.aux_heads.atss import ATSSHead, centerness_target
from pipeline.models.aux_heads.base import AuxHead, AuxPositives
from pipeline.models.box_ops import DeltaXYWHCoder, box_iou
from pipeline.models.task_modules.anchors import base_anchors, grid_anchors, valid_flags
from pipeline.models.task_modules.atss_assigner import ATSSAssigner

# ----------------------------------------------------------------------------------------------- anchors


def test_atss_anchors_offset_zero_row_major():
    (a,) = grid_anchors([(2, 3)], [4], scales=(8,), ratios=(1.0,))
    assert a.shape == (6, 4)
    # size 8 * stride = 32, centres at (x * 4, y * 4), order (y, x)
    expected = torch.tensor(
        [[x * 4 - 16.0, y * 4 - 16.0, x * 4 + 16.0, y * 4 + 16.0] for y in range(2) for x in range(3)]
    )
    assert torch.equal(a, expected)


def test_rpn_base_anchors_match_mmdet_formula():
    base = base_anchors(4, [4 * 2 ** (i / 3) for i in range(3)], [0.5, 1.0, 2.0])
    assert base.shape == (9, 4)
    rows = []
    for r in (0.5, 1.0, 2.0):  # ratio-major, then scale
        for i in range(3):
            s = 4 * 2 ** (i / 3)
            w, h = 4 * (1 / math.sqrt(r)) * s, 4 * math.sqrt(r) * s
            rows.append([-0.5 * w, -0.5 * h, 0.5 * w, 0.5 * h])
    assert torch.allclose(base, torch.tensor(rows), atol=1e-5)
    (grid,) = grid_anchors([(1, 2)], [8], ratios=(0.5, 1.0, 2.0), octave_base_scale=4, scales_per_octave=3)
    assert grid.shape == (18, 4)  # (y, x, anchor): the second location's 9 anchors are shifted by x = 8
    assert torch.allclose(grid[9:], grid[:9] + torch.tensor([8.0, 0, 8.0, 0]))


def test_valid_flags_use_ceil_of_pad_size():
    (f,) = valid_flags([(3, 4)], [8], pad_size=(17, 9))  # ceil(17/8) = 3 rows, ceil(9/8) = 2 cols
    assert f.view(3, 4).tolist() == [[True, True, False, False]] * 3


def test_anchor_args_are_validated():
    with pytest.raises(ValueError, match="exactly one"):
        grid_anchors([(1, 1)], [4], scales=(8,), octave_base_scale=4, scales_per_octave=1)


# ---------------------------------------------------------------------------------------------- assigner


def _reference_atss(anchors, num_level, gts, topk):
    """Loop-by-loop ATSS in float64 (the paper's algorithm), for comparison."""
    anchors, gts = anchors.double(), gts.double()
    iou = box_iou(anchors, gts)
    actr = (anchors[:, :2] + anchors[:, 2:]) / 2
    best = torch.full((len(anchors),), -1.0, dtype=torch.float64)
    assigned = torch.zeros(len(anchors), dtype=torch.long)
    for g in range(len(gts)):
        gctr = (gts[g, :2] + gts[g, 2:]) / 2
        dist = (actr - gctr).norm(dim=1)
        cands, start = [], 0
        for n in num_level:
            order = sorted(range(start, start + n), key=lambda j: (dist[j].item(), j))
            cands += order[: min(topk, n)]
            start += n
        vals = iou[cands, g]
        thr = vals.mean() + vals.std()
        for j in cands:
            cx, cy = actr[j]
            inside = min(cx - gts[g, 0], cy - gts[g, 1], gts[g, 2] - cx, gts[g, 3] - cy) > 0.01
            if iou[j, g] >= thr and inside and iou[j, g] > best[j]:
                best[j] = iou[j, g]
                assigned[j] = g + 1
    return assigned


def test_atss_assigner_threshold_mean_plus_std_matches_reference():
    g = torch.Generator().manual_seed(0)
    (l0, l1) = grid_anchors([(6, 6), (3, 3)], [8, 16], scales=(4,), ratios=(1.0,))
    anchors = torch.cat([l0, l1])
    xy = torch.rand(5, 2, generator=g) * 40
    wh = torch.rand(5, 2, generator=g) * 30 + 6
    gts = torch.cat([xy, xy + wh], 1)
    res = ATSSAssigner(topk=4).assign(anchors, [36, 9], gts, torch.arange(5))
    ref = _reference_atss(anchors, [36, 9], gts, topk=4)
    assert res.pos_mask.sum() > 0
    assert torch.equal(res.gt_inds, ref)
    assert torch.equal(res.labels[res.pos_mask], res.gt_inds[res.pos_mask] - 1)
    assert (res.labels[~res.pos_mask] == -1).all()


def test_atss_assigner_centre_rule_excludes_high_iou_anchor_outside_gt():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    anchors = torch.tensor(
        [
            [-10.2, 0.0, 10.0, 10.0],  # IoU 0.495, centre x = -0.1: outside
            [-9.99, 0.0, 10.0, 10.0],  # IoU 0.50025, centre x = 0.005: inside but closer than 0.01 to the edge
            [1.0, 1.0, 9.0, 9.0],  # IoU 0.64, centre inside
        ]
        + [[100.0 + 20 * i, 100.0, 110.0 + 20 * i, 110.0] for i in range(6)]  # IoU 0
    )
    iou = box_iou(anchors, gt)[:, 0]
    thr = iou.mean() + iou.std()
    assert iou[0] >= thr and iou[1] >= thr  # the IoU rule alone would take them
    res = ATSSAssigner(topk=9).assign(anchors, [9], gt, torch.tensor([3]))
    assert res.gt_inds.tolist() == [0, 0, 1] + [0] * 6
    assert res.labels[2] == 3


def test_atss_assigner_ties_go_to_highest_iou():
    gts = torch.tensor([[0.0, 0.0, 20.0, 20.0], [2.0, 2.0, 12.0, 12.0]])
    anchors = torch.tensor([[2.0, 2.0, 12.0, 12.0]] + [[200.0 + 20 * i, 0.0, 210.0 + 20 * i, 10.0] for i in range(4)])
    res = ATSSAssigner(topk=9).assign(anchors, [5], gts, torch.tensor([5, 7]))
    # anchor 0 is positive for both GTs (IoU 0.25 and 1.0): it goes to GT 1
    assert res.gt_inds[0] == 2 and res.labels[0] == 7
    assert torch.isclose(res.max_overlaps[0], torch.tensor(1.0))


def test_atss_assigner_zero_gt_all_negative():
    anchors = grid_anchors([(4, 4)], [8], scales=(8,))[0]
    res = ATSSAssigner().assign(anchors, [16], torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert (res.gt_inds == 0).all() and (res.labels == -1).all() and res.num_gts == 0


def test_atss_assigner_topk_is_per_level_and_capped_by_level_size():
    # level 0 has 2 anchors (< topk), level 1 has 16: candidates = 2 + 3
    gts = torch.tensor([[0.0, 0.0, 30.0, 30.0]])
    lv0 = torch.tensor([[0.0, 0.0, 30.0, 30.0], [500.0, 500.0, 530.0, 530.0]])
    lv1 = grid_anchors([(4, 4)], [10], scales=(1,))[0]
    res = ATSSAssigner(topk=3).assign(torch.cat([lv0, lv1]), [2, 16], gts, torch.tensor([0]))
    ref = _reference_atss(torch.cat([lv0, lv1]), [2, 16], gts, topk=3)
    assert torch.equal(res.gt_inds, ref) and res.gt_inds[0] == 1


# ------------------------------------------------------------------------------------------ adapter, head


def test_adapter_splits_memory_and_adds_stride128_level():
    shapes = [(4, 6), (2, 3), (1, 2)]
    memory = torch.randn(2, sum(h * w for h, w in shapes), 32)
    adapter = MultiScaleAdapter(32)
    maps = adapter(memory, torch.tensor(shapes))
    assert [tuple(m.shape) for m in maps] == [(2, 32, 4, 6), (2, 32, 2, 3), (2, 32, 1, 2), (2, 32, 1, 1)]
    assert torch.equal(maps[1][1, :, 1, 2], memory[1, 24 + 1 * 3 + 2])  # level 1, row 1, col 2
    assert set(adapter.state_dict()) == {
        "downsample.0.weight",
        "downsample.0.bias",
        "downsample.1.weight",
        "downsample.1.bias",
    }


SIZES = [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]  # a 64 x 96 batch, strides 4..128


def _feats(c=32, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, h, w, generator=g) for h, w in SIZES]


def _targets():
    return [
        {"boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4], [0.2, 0.3, 0.12, 0.2]]), "labels": torch.tensor([1, 2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]


def test_atss_head_keys_match_authors_names():
    head = ATSSHead(num_classes=80)
    keys = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert keys["cls_convs.0.conv.weight"] == (256, 256, 3, 3) and "cls_convs.0.conv.bias" not in keys
    assert keys["reg_convs.0.gn.weight"] == (256,)
    assert keys["atss_cls.weight"] == (80, 256, 3, 3) and keys["atss_centerness.bias"] == (1,)
    assert keys["scales.5.scale"] == ()
    assert len(keys) == 18
    assert torch.allclose(head.atss_cls.bias, torch.full((80,), -math.log(99)))
    assert isinstance(head, AuxHead)


def test_atss_head_forward_train_losses_positives_and_gradients():
    torch.manual_seed(0)
    head = ATSSHead(num_classes=3, in_channels=32, feat_channels=32)
    feats = [f.requires_grad_() for f in _feats()]
    img_sizes = torch.tensor([[64, 96], [48, 80]])
    losses, pos = head.forward_train(feats, _targets(), img_sizes)
    assert set(losses) == {"loss_cls1", "loss_bbox1", "loss_centerness1"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    n = sum(h * w for h, w in SIZES)
    assert isinstance(pos, AuxPositives) and pos.head == "atss" and pos.feats is None
    assert [tuple(c.shape) for c in pos.coords] == [(n, 4), (n, 4)]
    assert [tuple(t.shape) for t in pos.targets] == [(n, 4), (n, 4)]
    assert pos.labels[1].eq(3).all()  # the image without GT has only background
    is_pos = pos.labels[0] < 3
    assert is_pos.sum() > 0 and set(pos.labels[0][is_pos].tolist()) <= {1, 2}
    gt_xyxy = torch.tensor([[33.6, 19.2, 62.4, 44.8], [13.44, 12.8, 24.96, 25.6]])
    dist = torch.cdist(
        pos.targets[0][is_pos], gt_xyxy, compute_mode="donot_use_mm_for_euclid_dist"
    )  # every positive's target is one of the GT boxes
    assert (dist.min(1).values < 1e-4).all() and (dist.min(0).values < 1e-4).all()
    assert (pos.targets[0][~is_pos] == 0).all()
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in head.parameters())
    # every weight gets a non-zero gradient; a level's Scale only when that level has positives
    pos_levels = {
        lvl for lvl, lab in enumerate(torch.split(pos.labels[0], [h * w for h, w in SIZES])) if (lab < 3).any()
    }
    zero = {k for k, p in head.named_parameters() if not p.grad.abs().sum() > 0}
    assert zero == {f"scales.{lvl}.scale" for lvl in range(6) if lvl not in pos_levels}
    assert len(pos_levels) >= 1 and all(f.grad is not None for f in feats)


def test_atss_head_invalid_anchors_are_ignored_but_exported_as_background():
    head = ATSSHead(num_classes=3, in_channels=32, feat_channels=32, pad_size_divisor=32)
    # image 2 is 32 x 32: at stride 4 only the first 8 x 8 locations are valid (pad_size_divisor 32)
    sizes = torch.tensor([[64, 96], [32, 32]])
    tg = [_targets()[0], {"boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]]), "labels": torch.tensor([0])}]
    _, pos = head.forward_train(_feats(), tg, sizes)
    lv0 = pos.labels[1][: 16 * 24].view(16, 24)
    assert (lv0[8:] == 3).all() and (lv0[:, 8:] == 3).all()


def test_atss_loss_matches_per_level_mmdet_style_reference():
    """The vectorised loss against a per-level, per-image computation written like mmdet's loss_by_feat."""
    torch.manual_seed(1)
    nc = 3
    head = ATSSHead(num_classes=nc, in_channels=32, feat_channels=32, pad_size_divisor=32)
    with torch.no_grad():  # make predictions non-trivial
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    feats = _feats(seed=3)
    img_sizes = torch.tensor([[64, 96], [64, 90]])
    tg = [_targets()[0], {"boxes": torch.tensor([[0.4, 0.6, 0.5, 0.3]]), "labels": torch.tensor([0])}]
    losses, pos = head.forward_train(feats, tg, img_sizes)
    cls_scores, bbox_preds, ctrs = head(feats)
    coder = DeltaXYWHCoder(stds=(0.1, 0.1, 0.2, 0.2))
    num_pos = sum(max(int((lab < nc).sum()), 1) for lab in pos.labels)
    eps = torch.finfo(torch.float32).eps
    tot_cls = tot_bbox = tot_ctr = 0.0
    ctr_sum = 0.0
    start = 0
    for lvl, (h, wd) in enumerate(SIZES):
        end = start + h * wd
        for i in range(2):
            lab = pos.labels[i][start:end]
            anc = pos.coords[i][start:end]
            tgt = pos.targets[i][start:end]
            valid = torch.ones(h * wd, dtype=torch.bool)
            s = 4 * 2**lvl
            ih, iw = (int(v) for v in img_sizes[i])
            vh, vw = min(math.ceil(math.ceil(ih / 32) * 32 / s), h), min(math.ceil(math.ceil(iw / 32) * 32 / s), wd)
            valid = valid.view(h, wd)
            valid[vh:] = False
            valid[:, vw:] = False
            valid = valid.reshape(-1)
            logit = cls_scores[lvl][i].permute(1, 2, 0).reshape(-1, nc)
            p = logit.sigmoid()
            t = F.one_hot(lab, nc + 1)[:, :nc].float()
            pt = (1 - p) * t + p * (1 - t)
            fw = (0.25 * t + 0.75 * (1 - t)) * pt.pow(2)
            tot_cls += (F.binary_cross_entropy_with_logits(logit, t, reduction="none") * fw)[valid].sum()
            pm = lab < nc
            if pm.any():
                ct = centerness_target(anc[pm], tgt[pm])
                d = bbox_preds[lvl][i].permute(1, 2, 0).reshape(-1, 4)[pm]
                box = coder.decode(anc[pm], d)
                lt = torch.max(box[:, :2], tgt[pm][:, :2])
                rb = torch.min(box[:, 2:], tgt[pm][:, 2:])
                inter = (rb - lt).clamp(min=0).prod(1)
                a1 = (box[:, 2:] - box[:, :2]).prod(1)
                a2 = (tgt[pm][:, 2:] - tgt[pm][:, :2]).prod(1)
                union = a1 + a2 - inter
                enc = (torch.max(box[:, 2:], tgt[pm][:, 2:]) - torch.min(box[:, :2], tgt[pm][:, :2])).prod(1)
                giou = inter / union - (enc - union) / enc
                tot_bbox += ((1 - giou) * ct).sum()
                c = ctrs[lvl][i].permute(1, 2, 0).reshape(-1)[pm]
                tot_ctr += F.binary_cross_entropy_with_logits(c, ct, reduction="sum")
                ctr_sum += ct.sum()
        start = end
    assert num_pos > 2
    # the head's terms are unweighted (the table's weights are applied once by the model, loss_weights.weigh)
    torch.testing.assert_close(losses["loss_cls1"], tot_cls / (num_pos + eps), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["loss_bbox1"], tot_bbox / max(ctr_sum, 1.0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["loss_centerness1"], tot_ctr / num_pos, rtol=1e-5, atol=1e-6)


def test_atss_head_all_images_without_gt():
    head = ATSSHead(num_classes=3, in_channels=32, feat_channels=32)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    losses, pos = head.forward_train(_feats(), [empty, empty], torch.tensor([[64, 96], [64, 96]]))
    assert losses["loss_bbox1"] == 0 and losses["loss_centerness1"] == 0 and losses["loss_cls1"] > 0
    assert all(lab.eq(3).all() for lab in pos.labels)
    sum(losses.values()).backward()  # zero losses keep a graph
