"""Faster R-CNN auxiliary head: MaxIoU assignment, random sampling, RoI level mapping, RPN proposals and losses,
and the composed head's losses, gradients and exported positives.
Tiny sizes: 32 channels, 64x80 images, at most 100 proposals per image."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from pipeline.models.aux_heads.faster_rcnn import FasterRCNNHead
from pipeline.models.aux_heads.roi_head import map_roi_levels, multi_level_roi_align
from pipeline.models.config import FasterRCNNConfig
from pipeline.models.task_modules.atss_assigner import AssignResult
from pipeline.models.task_modules.max_iou_assigner import MaxIoUAssigner
from pipeline.models.task_modules.random_sampler import RandomSampler

STRIDES = (4, 8, 16, 32, 64, 128)
C = 32  # tiny channel count for speed; the authors use 256


def _feats(b: int = 2, h: int = 64, w: int = 80, requires_grad: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, C, -(-h // s), -(-w // s), generator=g).requires_grad_(requires_grad) for s in STRIDES]


def _target(boxes_xyxy: list[list[float]], labels: list[int], h: int, w: int) -> dict[str, torch.Tensor]:
    xyxy = torch.tensor(boxes_xyxy, dtype=torch.float32).reshape(-1, 4)
    cxcywh = torch.stack(
        [
            (xyxy[:, 0] + xyxy[:, 2]) / 2 / w,
            (xyxy[:, 1] + xyxy[:, 3]) / 2 / h,
            (xyxy[:, 2] - xyxy[:, 0]) / w,
            (xyxy[:, 3] - xyxy[:, 1]) / h,
        ],
        dim=1,
    )
    return {"boxes": cxcywh, "labels": torch.tensor(labels, dtype=torch.long), "size": torch.tensor([h, w])}


def _head(**cfg_changes: object) -> FasterRCNNHead:
    torch.manual_seed(0)
    changes = {"roi_fc_dim": 64, "rpn_nms_pre": 1000, "rpn_max_per_img": 100, **cfg_changes}
    cfg = dataclasses.replace(FasterRCNNConfig(), **changes)
    return FasterRCNNHead(num_classes=3, cfg=cfg, in_channels=C)


# ---------------------------------------------------------------- MaxIoUAssigner


def test_max_iou_thresholds_rpn():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    priors = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # IoU 1.0 -> positive
            [0.0, 0.0, 10.0, 5.0],  # IoU 0.5 -> ignored (between 0.3 and 0.7)
            [0.0, 0.0, 10.0, 3.0],  # IoU 0.3 -> ignored (neg needs < 0.3)
            [0.0, 0.0, 10.0, 2.0],  # IoU 0.2 -> negative
            [20.0, 20.0, 30.0, 30.0],  # IoU 0 -> negative
        ]
    )
    res = MaxIoUAssigner(0.7, 0.3, 0.3, match_low_quality=True).assign(priors, gt, torch.tensor([2]))
    assert res.gt_inds.tolist() == [1, -1, -1, 0, 0]
    assert res.labels.tolist() == [2, -1, -1, -1, -1]


def test_max_iou_thresholds_roi_boundary():
    """RoI config: pos = neg = min_pos = 0.5, no low-quality; IoU exactly 0.5 is positive, 0.49 negative."""
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    priors = torch.tensor([[0.0, 0.0, 10.0, 5.0], [0.0, 0.0, 10.0, 4.9], [50.0, 50.0, 60.0, 60.0]])
    res = MaxIoUAssigner(0.5, 0.5, 0.5, match_low_quality=False).assign(priors, gt, torch.tensor([0]))
    assert res.gt_inds.tolist() == [1, 0, 0]


def test_max_iou_low_quality_matches():
    gts = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # best IoU 0.5, reached by two priors -> both assigned (gt_max_assign_all)
            [100.0, 100.0, 110.0, 110.0],  # best IoU 0.2 < min_pos 0.3 -> nothing
            [200.0, 0.0, 210.0, 10.0],  # best IoU 0.5 at one prior
        ]
    )
    priors = torch.tensor(
        [
            [0.0, 0.0, 10.0, 5.0],  # 0.5 with GT 0
            [0.0, 5.0, 10.0, 10.0],  # 0.5 with GT 0 (tie)
            [0.0, 0.0, 10.0, 4.0],  # 0.4 with GT 0 -> ignored, not the GT's best
            [100.0, 100.0, 110.0, 102.0],  # 0.2 with GT 1 -> negative
            [200.0, 0.0, 205.0, 10.0],  # 0.5 with GT 2
        ]
    )
    labels = torch.tensor([0, 1, 2])
    with_lq = MaxIoUAssigner(0.7, 0.3, 0.3, match_low_quality=True).assign(priors, gts, labels)
    assert with_lq.gt_inds.tolist() == [1, 1, -1, 0, 3]
    assert with_lq.labels.tolist() == [0, 0, -1, -1, 2]
    without = MaxIoUAssigner(0.7, 0.3, 0.3, match_low_quality=False).assign(priors, gts, labels)
    assert without.gt_inds.tolist() == [-1, -1, -1, 0, -1]


def test_max_iou_low_quality_last_gt_wins():
    """A prior that is the best match of two GTs goes to the later GT (mmdet loops over GTs in order)."""
    gts = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    priors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [30.0, 30.0, 40.0, 40.0]])
    res = MaxIoUAssigner(0.7, 0.3, 0.3).assign(priors, gts, torch.tensor([0, 1]))
    assert res.gt_inds.tolist() == [2, 0]
    assert res.labels.tolist() == [1, -1]


def test_max_iou_no_gt_all_negative():
    priors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 8.0, 9.0]])
    res = MaxIoUAssigner(0.7, 0.3, 0.3).assign(priors, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert res.gt_inds.tolist() == [0, 0]
    assert res.labels.tolist() == [-1, -1]


# ---------------------------------------------------------------- RandomSampler


def _assign(num_pos: int, num_neg: int, num_ignored: int = 0) -> AssignResult:
    gt_inds = torch.cat([torch.ones(num_pos), torch.zeros(num_neg), -torch.ones(num_ignored)]).long()
    gt_inds = gt_inds[torch.randperm(gt_inds.numel())]
    labels = torch.where(gt_inds > 0, torch.zeros_like(gt_inds), -torch.ones_like(gt_inds))
    return AssignResult(1, gt_inds, torch.zeros(gt_inds.numel()), labels)


@pytest.mark.parametrize(
    ("num_pos", "num_neg", "exp_pos", "exp_neg"),
    [(300, 1000, 128, 128), (10, 1000, 10, 246), (0, 1000, 0, 256), (10, 20, 10, 20)],
)
def test_rpn_sampler_counts(num_pos, num_neg, exp_pos, exp_neg):
    torch.manual_seed(0)
    assign = _assign(num_pos, num_neg, num_ignored=50)
    priors = torch.rand(assign.gt_inds.numel(), 4)
    gt = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    s = RandomSampler(256, 0.5).sample(assign, priors, gt, torch.tensor([0]))
    assert (s.pos_inds.numel(), s.neg_inds.numel()) == (exp_pos, exp_neg)
    assert bool((assign.gt_inds[s.pos_inds] > 0).all()) and bool((assign.gt_inds[s.neg_inds] == 0).all())
    assert torch.equal(s.pos_inds, s.pos_inds.sort().values) and s.pos_inds.unique().numel() == exp_pos
    assert s.avg_factor == max(exp_pos, 1) + max(exp_neg, 1)
    assert s.pos_gt_boxes.shape == (exp_pos, 4)


def test_roi_sampler_adds_gt_first_and_caps_positives():
    torch.manual_seed(0)
    assign = _assign(400, 2000)
    priors = torch.rand(assign.gt_inds.numel(), 4) * 10
    gt = torch.tensor([[1.0, 2.0, 30.0, 40.0], [5.0, 5.0, 9.0, 9.0]])
    gt_labels = torch.tensor([2, 1])
    s = RandomSampler(512, 0.25, add_gt_as_proposals=True).sample(assign, priors, gt, gt_labels)
    assert s.pos_inds.numel() == 128 and s.neg_inds.numel() == 384
    assert s.priors.shape[0] == priors.shape[0] + 2 and torch.equal(s.priors[:2], gt)
    # with few positives every GT row is sampled, and sorted indices put them first
    few_priors = torch.rand(2005, 4) * 10
    few = RandomSampler(512, 0.25, add_gt_as_proposals=True).sample(_assign(5, 2000), few_priors, gt, gt_labels)
    assert few.pos_inds[:2].tolist() == [0, 1] and few.pos_inds.numel() == 7
    assert torch.equal(few.pos_priors[:2], gt) and few.pos_labels[:2].tolist() == [2, 1]
    assert torch.equal(few.pos_gt_boxes[:2], gt)


# ---------------------------------------------------------------- RoI feature extraction


def test_map_roi_levels():
    sides = torch.tensor([10.0, 55.9, 56.0, 111.9, 112.0, 224.0, 448.0, 2000.0])
    rois = torch.stack([torch.zeros_like(sides), torch.zeros_like(sides), sides, sides], 1)
    assert map_roi_levels(rois, 5, 56.0).tolist() == [0, 0, 0, 0, 1, 2, 3, 4]


def test_multi_level_roi_align_picks_the_mapped_level():
    feats = [torch.full((2, 3, 64 // s, 64 // s), float(lvl + 1)) for lvl, s in enumerate((4, 8, 16, 32, 64))]
    rois = torch.tensor([[0, 4.0, 4.0, 20.0, 20.0], [1, 0.0, 0.0, 60.0, 60.0], [1, 2.0, 2.0, 63.0, 63.0]])
    out = multi_level_roi_align(feats, rois, (4, 8, 16, 32, 64), output_size=7, finest_scale=28.0)
    assert out.shape == (3, 3, 7, 7)
    expected = map_roi_levels(rois[:, 1:], 5, 28.0).float() + 1  # 0, 1, 1 -> values 1, 2, 2
    assert expected.tolist() == [1.0, 2.0, 2.0]
    torch.testing.assert_close(out.mean(dim=(1, 2, 3)), expected)


# ---------------------------------------------------------------- RPN


def test_rpn_proposals_levelwise_nms_clip_and_nms_pre():
    head = _head(rpn_nms_pre=2)
    rpn = head.rpn_head
    box = [10.0, 10.0, 50.0, 50.0]
    # level 0: three identical anchors (scores 5, 4, 6), level 1: the same box again (score 3)
    anchors = [torch.tensor([box, box, box]), torch.tensor([box, [90.0, 90.0, 140.0, 140.0]])]
    objectness = [torch.tensor([5.0, 4.0, 6.0]).view(1, 3, 1, 1), torch.tensor([3.0, 2.0]).view(1, 2, 1, 1)]
    deltas = [torch.zeros(1, 12, 1, 1), torch.zeros(1, 8, 1, 1)]
    props = rpn.proposals(objectness, deltas, anchors, torch.tensor([[100, 120]]))[0]
    # nms_pre=2 keeps scores 6, 5 on level 0; NMS removes the 5; level 1's copy survives (other level);
    # the last box is clipped to the 100 x 120 image
    torch.testing.assert_close(props, torch.tensor([box, box, [90.0, 90.0, 120.0, 100.0]]))


def test_rpn_drops_empty_boxes_and_caps_count():
    rpn = _head(rpn_max_per_img=3).rpn_head
    anchors = [
        torch.tensor(
            [[0.0, 0.0, 10.0, 10.0], [200.0, 0.0, 220.0, 10.0]]
            + [[i * 20.0, 0.0, i * 20.0 + 10, 10.0] for i in range(1, 6)]
        )
    ]
    objectness = [torch.tensor([0.0, 10.0, 1.0, 2.0, 3.0, 4.0, 5.0]).view(1, 7, 1, 1)]  # out-of-image box is best
    props = rpn.proposals(objectness, [torch.zeros(1, 28, 1, 1)], anchors, torch.tensor([[50, 150]]))[0]
    assert props.shape == (3, 4)  # the best anchor (x >= 200) clips to zero width and is dropped
    assert bool((props[:, 2] <= 150).all()) and bool((props[:, 2] > props[:, 0]).all())


def test_rpn_loss_normaliser_and_valid_flags():
    """Zero cls/reg convs: BCE = ln 2 on every sampled anchor, so loss = ln2 * #sampled / avg_factor (unweighted).
    Image 0 has a GT (#pos > 0), image 1 none: avg_factor = 256 + (1 + 256). Anchors beyond the small image's own
    padded extent (32 x 32 -> rows/cols >= 32 / stride) get no gradient."""
    head = _head()
    rpn = head.rpn_head
    torch.nn.init.zeros_(rpn.rpn_cls.weight)
    torch.nn.init.zeros_(rpn.rpn_reg.weight)
    feats = _feats()
    objectness, deltas = rpn(feats)
    objectness = [o.detach().requires_grad_(True) for o in objectness]
    deltas = [d.detach() for d in deltas]
    sizes = [(o.shape[-2], o.shape[-1]) for o in objectness]
    anchors = rpn.anchors(sizes, torch.device("cpu"))
    gt = [torch.tensor([[10.0, 12.0, 40.0, 50.0]]), torch.zeros(0, 4)]
    losses = rpn.loss(objectness, deltas, anchors, gt, torch.tensor([[64, 80], [32, 32]]))
    expected = math.log(2) * (256 + 256) / (256 + 257)
    assert losses["loss_rpn_cls"].item() == pytest.approx(expected, rel=1e-5)
    assert losses["loss_rpn_bbox"].item() > 0
    losses["loss_rpn_cls"].backward()
    g = objectness[0].grad  # (2, 9, 16, 20), stride 4
    assert bool((g[1, :, 8:, :] == 0).all()) and bool((g[1, :, :, 8:] == 0).all())
    assert bool((g[1, :, :8, :8] != 0).any()) and bool((g[0, :, 8:, 8:] != 0).any())


# ---------------------------------------------------------------- composed head


def test_forward_train_losses_grads_and_positives():
    head = _head()
    feats = _feats(requires_grad=True)
    h0, w0, h1, w1 = 64, 80, 50, 60
    gt0 = torch.tensor([[10.0, 12.0, 40.0, 50.0], [45.0, 5.0, 75.0, 30.0]])
    targets = [_target(gt0.tolist(), [1, 2], h0, w0), _target([[5.0, 5.0, 30.0, 40.0]], [0], h1, w1)]
    img_sizes = torch.tensor([[h0, w0], [h1, w1]])
    losses, pos = head.forward_train(feats, targets, img_sizes)

    assert set(losses) == {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls0", "loss_bbox0", "acc0"}
    assert all(bool(torch.isfinite(v)) and v.dim() == 0 for v in losses.values())
    assert not losses["acc0"].requires_grad and 0 <= losses["acc0"].item() <= 100
    assert losses["loss_bbox0"].item() > 0 and losses["loss_rpn_bbox"].item() > 0
    sum(v for k, v in losses.items() if "loss" in k).backward()
    missing = [n for n, p in head.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert missing == []
    assert all(f.grad is not None for f in feats)

    # export: truncated to the smallest per-image RoI count = min(#proposals + #GT) (<= 512 sampled here)
    with torch.no_grad():
        objectness, deltas = head.rpn_head(feats)
        anchors = head.rpn_head.anchors([(o.shape[-2], o.shape[-1]) for o in objectness], torch.device("cpu"))
        props = head.rpn_head.proposals(objectness, deltas, anchors, img_sizes)
    m = min(props[0].shape[0] + 2, props[1].shape[0] + 1, 512)
    assert pos.head == "faster_rcnn"
    assert [c.shape for c in pos.coords] == [(m, 4), (m, 4)]
    assert [t.shape for t in pos.targets] == [(m, 4), (m, 4)]
    assert [lab.shape for lab in pos.labels] == [(m,), (m,)]
    assert pos.feats is not None and [f.shape for f in pos.feats] == [(m, C), (m, C)]
    # GT boxes are among the RoIs, first, with their labels and themselves as targets
    torch.testing.assert_close(pos.coords[0][:2], gt0)
    torch.testing.assert_close(pos.targets[0][:2], gt0)
    assert pos.labels[0][:2].tolist() == [1, 2] and pos.labels[1][0].item() == 0
    # positives first, then background (label nc = 3) with zero targets
    for lab, tgt in zip(pos.labels, pos.targets):
        is_bg = lab == 3
        first_bg = int(is_bg.nonzero()[0]) if is_bg.any() else lab.numel()
        assert bool(is_bg[first_bg:].all()) and not bool(is_bg[:first_bg].any())
        assert bool((tgt[is_bg] == 0).all())


def test_no_gt_images():
    head = _head()
    feats = _feats(requires_grad=True)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    losses, pos = head.forward_train(feats, [empty, empty], torch.tensor([[64, 80], [48, 64]]))
    assert all(bool(torch.isfinite(v)) for v in losses.values())
    assert losses["loss_rpn_bbox"].item() == 0 and losses["loss_bbox0"].item() == 0
    assert losses["loss_rpn_cls"].item() > 0 and losses["loss_cls0"].item() > 0
    assert all(bool((lab == 3).all()) for lab in pos.labels)
    assert pos.coords[0].shape == pos.coords[1].shape and pos.coords[0].shape[0] <= 512
    sum(v for k, v in losses.items() if "loss" in k).backward()
    assert head.roi_head.bbox_head.fc_cls.weight.grad is not None


def test_parameter_names_map_onto_the_authors_keys():
    """Shapes of the authors' keys (golden keys.tsv, 80 classes): `roi_head.0.bbox_head.*` -> `roi_head.bbox_head.*`."""
    authors = {
        "rpn_head.rpn_conv.weight": (256, 256, 3, 3),
        "rpn_head.rpn_conv.bias": (256,),
        "rpn_head.rpn_cls.weight": (9, 256, 1, 1),
        "rpn_head.rpn_cls.bias": (9,),
        "rpn_head.rpn_reg.weight": (36, 256, 1, 1),
        "rpn_head.rpn_reg.bias": (36,),
        "roi_head.0.bbox_head.fc_cls.weight": (81, 1024),
        "roi_head.0.bbox_head.fc_cls.bias": (81,),
        "roi_head.0.bbox_head.fc_reg.weight": (320, 1024),
        "roi_head.0.bbox_head.fc_reg.bias": (320,),
        "roi_head.0.bbox_head.shared_fcs.0.weight": (1024, 12544),
        "roi_head.0.bbox_head.shared_fcs.0.bias": (1024,),
        "roi_head.0.bbox_head.shared_fcs.1.weight": (1024, 1024),
        "roi_head.0.bbox_head.shared_fcs.1.bias": (1024,),
    }
    with torch.device("meta"):
        head = FasterRCNNHead(num_classes=80)
    ours = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert ours == {k.replace("roi_head.0.", "roi_head."): v for k, v in authors.items()}
