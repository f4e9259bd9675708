"""GFL auxiliary head: ATSS assignment of its anchors against a plain loop, DFL and the integral against their
formulas, QFL with IoU targets, unweighted losses with gradients, and the exported positives."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from pipeline.models.aux_heads.gfl import GFLHead, distribution_focal_loss
from pipeline.models.aux_heads.table import GFLConfig

SIZES = [(12, 16), (6, 8), (3, 4), (2, 2), (1, 1)]  # a 96 x 128 batch, strides 8..128
STRIDES = (8, 16, 32, 64, 128)
C, NC = 32, 3


def _loop_atss(anchors, num_level, gts, topk=9):
    """ATSS one GT and one candidate at a time (float64): k nearest centres per level, IoU >= mean + std, centre
    inside the GT, the highest IoU wins."""
    anchors, gts = anchors.double(), gts.double()
    iou = box_iou(anchors, gts)
    ctr = (anchors[:, :2] + anchors[:, 2:]) / 2
    best = [-1.0] * len(anchors)
    out = [0] * len(anchors)
    for g in range(len(gts)):
        gc = (gts[g, :2] + gts[g, 2:]) / 2
        cands, start = [], 0
        for n in num_level:
            d = [((ctr[j] - gc).norm().item(), j) for j in range(start, start + n)]
            cands += [j for _, j in sorted(d)[: min(topk, n)]]
            start += n
        vals = iou[cands, g]
        thr = (vals.mean() + vals.std()).item()
        for j in cands:
            x, y = ctr[j].tolist()
            inside = min(x - gts[g, 0], y - gts[g, 1], gts[g, 2] - x, gts[g, 3] - y) > 0.01
            if iou[j, g].item() >= thr and inside and iou[j, g].item() > best[j]:
                best[j], out[j] = iou[j, g].item(), g + 1
    return torch.tensor(out)


def _feats(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, C, h, w, generator=g).requires_grad_() for h, w in SIZES]


def test_labels_match_loop_atss_on_random_boxes():
    torch.manual_seed(0)
    head = GFLHead(NC, C, C, strides=STRIDES)
    g = torch.Generator().manual_seed(3)
    n_level = [h * w for h, w in SIZES]
    total = 0
    for trial in range(3):
        xy = torch.rand(2 + 2 * trial, 2, generator=g) * 0.7
        wh = torch.rand(len(xy), 2, generator=g) * 0.3 + 0.05
        boxes = torch.cat([xy + wh / 2, wh], 1)  # cxcywh normalised
        labels = torch.randint(NC, (len(xy),), generator=g)
        targets = [{"boxes": boxes, "labels": labels}, {"boxes": boxes[:1], "labels": labels[:1]}]
        _, pos = head.forward_train(_feats(), targets, torch.tensor([[96, 128], [96, 128]]))
        gt = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], 1) * torch.tensor(
            [128.0, 96.0, 128.0, 96.0]
        )
        ref = _loop_atss(pos.coords[0], n_level, gt)
        lab = pos.labels[0]
        assert torch.equal(lab < NC, ref > 0), trial
        assert torch.equal(lab[ref > 0], labels[ref[ref > 0] - 1])
        torch.testing.assert_close(pos.targets[0][ref > 0], gt[ref[ref > 0] - 1])
        total += int((ref > 0).sum())
    assert total > 10


def test_dfl_and_integral():
    logits = torch.randn(5, 17)
    y = torch.tensor([0.0, 3.3, 7.5, 15.99, 10.0])
    lo = y.floor().long()
    ref = F.cross_entropy(logits, lo, reduction="none") * (lo + 1 - y) + F.cross_entropy(
        logits, lo + 1, reduction="none"
    ) * (y - lo)
    torch.testing.assert_close(distribution_focal_loss(logits, y), ref)
    # the integral of a two-bin distribution (0.7 at 3, 0.3 at 4) is 3.3, the DFL target it minimises
    two = torch.full((1, 17), -1e4)
    two[0, 3], two[0, 4] = torch.log(torch.tensor(0.7)), torch.log(torch.tensor(0.3))
    assert abs((two.softmax(-1) @ torch.arange(17.0)).item() - 3.3) < 1e-5
    near = distribution_focal_loss(two, torch.tensor([3.3]))
    assert near < distribution_focal_loss(two, torch.tensor([5.0])) and near < distribution_focal_loss(
        two, torch.tensor([3.9])
    )


def test_forward_train_unweighted_losses_gradients_and_positives():
    torch.manual_seed(0)
    head = GFLHead(NC, C, C, GFLConfig(), STRIDES, loss_index=3, with_coord_feat=True)
    assert head.gfl_reg.out_channels == 4 * 17 and head.gfl_cls.out_channels == NC
    targets = [
        {"boxes": torch.tensor([[0.5, 0.5, 0.4, 0.5], [0.2, 0.3, 0.15, 0.2]]), "labels": torch.tensor([1, 2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]
    feats = _feats()
    losses, pos = head.forward_train(feats, targets, torch.tensor([[96, 128], [96, 128]]))
    assert set(losses) == {"loss_cls3", "loss_bbox3", "loss_dfl3"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    n = sum(h * w for h, w in SIZES)
    assert pos.head == "gfl" and [c.shape for c in pos.coords] == [(n, 4)] * 2 and len(pos.feats) == 2
    assert (pos.labels[0] < NC).sum() >= 2 and (pos.labels[1] == NC).all()
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in head.parameters())
    assert head.gfl_reg.weight.grad.abs().sum() > 0 and head.gfl_cls.weight.grad.abs().sum() > 0
