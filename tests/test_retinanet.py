"""RetinaNet auxiliary head: its MaxIoU assignment against a plain loop, 9 anchors per location, unweighted
losses with gradients, and the exported positives."""

from __future__ import annotations

import torch
from torchvision.ops import box_iou

from pipeline.models.aux_heads.base import AuxPositives
from pipeline.models.aux_heads.retinanet import RetinaNetHead
from pipeline.models.aux_heads.table import RetinaNetConfig

SIZES = [(12, 16), (6, 8), (3, 4), (2, 2), (1, 1)]  # a 96 x 128 batch, strides 8..128
STRIDES = (8, 16, 32, 64, 128)
C, NC = 32, 3


def _random_boxes(n: int, g: torch.Generator, size: float = 128.0) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g) * size * 0.8
    return torch.cat([xy, xy + 4 + torch.rand(n, 2, generator=g) * size * 0.5], 1)


def _loop_max_iou(anchors, gts, pos_iou, neg_iou, min_pos_iou):
    """mmdet MaxIoUAssigner, one anchor and one GT at a time (float64 IoU): -1 ignore, 0 neg, g + 1 pos."""
    iou = box_iou(anchors.double(), gts.double())
    out = []
    for j in range(len(anchors)):
        best, arg = max((iou[j, g].item(), -g) for g in range(len(gts)))
        out.append(0 if best < neg_iou else (-arg + 1 if best >= pos_iou else -1))
    for g in range(len(gts)):
        gmax = max(iou[j, g].item() for j in range(len(anchors)))
        if gmax >= min_pos_iou:
            for j in range(len(anchors)):
                if iou[j, g].item() == gmax:
                    out[j] = g + 1
    return torch.tensor(out)


def test_assignment_matches_loop_reference_on_random_boxes():
    g = torch.Generator().manual_seed(0)
    head = RetinaNetHead(NC, C, C, strides=STRIDES)
    for trial in range(4):
        anchors = _random_boxes(300, g)
        gts = _random_boxes(1 + trial * 3, g)
        labels = torch.randint(NC, (len(gts),), generator=g)
        got = head.assigner.assign(anchors, gts, labels).gt_inds
        ref = _loop_max_iou(anchors, gts, 0.5, 0.4, 0.0)
        assert torch.equal(got, ref), (trial, (got != ref).nonzero()[:5])
        lab, weight, assigned = head.targets(anchors, gts, labels)
        pos = ref > 0
        assert torch.equal(lab[pos], labels[ref[pos] - 1]) and (lab[~pos] == NC).all()
        assert torch.equal(weight, (ref >= 0).float())  # ignored anchors (IoU in [0.4, 0.5)) weigh 0
        assert torch.equal(assigned[pos], gts[ref[pos] - 1]) and (assigned[~pos] == 0).all()


def test_nine_anchors_per_location_and_authors_like_keys():
    head = RetinaNetHead(80, 256, 256)
    keys = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert keys["retina_cls.weight"] == (9 * 80, 256, 3, 3) and keys["retina_reg.weight"] == (36, 256, 3, 3)
    assert keys["cls_convs.0.conv.weight"] == (256, 256, 3, 3) and "cls_convs.1.conv.weight" not in keys
    assert head.scales == [4.0, 4 * 2 ** (1 / 3), 4 * 2 ** (2 / 3)] and head.ratios == (0.5, 1.0, 2.0)


def test_forward_train_unweighted_losses_gradients_and_positives():
    torch.manual_seed(0)
    head = RetinaNetHead(NC, C, C, RetinaNetConfig(), STRIDES, loss_index=2, with_coord_feat=True)
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(2, C, h, w, generator=g).requires_grad_() for h, w in SIZES]
    targets = [
        {"boxes": torch.tensor([[0.5, 0.5, 0.4, 0.5], [0.2, 0.3, 0.15, 0.2]]), "labels": torch.tensor([1, 2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]
    losses, pos = head.forward_train(feats, targets, torch.tensor([[96, 128], [96, 128]]))
    assert set(losses) == {"loss_cls2", "loss_bbox2"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    n = 9 * sum(h * w for h, w in SIZES)
    assert isinstance(pos, AuxPositives) and pos.head == "retinanet"
    assert [c.shape for c in pos.coords] == [(n, 4)] * 2 and [f.shape for f in pos.feats] == [(n, C)] * 2
    assert torch.equal(pos.feats[0][:9], feats[0][0, :, 0, 0].detach()[None].expand(9, -1))  # location 0, 9 anchors
    is_pos = pos.labels[0] < NC
    gt_xyxy = torch.tensor([[38.4, 24.0, 89.6, 72.0], [16.0, 19.2, 35.2, 38.4]])
    assert is_pos.sum() >= 2 and (pos.labels[1] == NC).all()
    assert (torch.cdist(pos.targets[0][is_pos], gt_xyxy).min(1).values < 1e-4).all()
    iou = box_iou(pos.coords[0][is_pos], pos.targets[0][is_pos]).diagonal()
    assert (iou > 0).all()  # positives overlap their GT (>= 0.5 or the GT's best anchor)
    sum(losses.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
