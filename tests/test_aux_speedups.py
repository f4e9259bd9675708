"""Speed-ups of the auxiliary heads that must not change numbers: memoised anchors / valid flags, RoIAlign's
vectorised CPU backward (forward bit-identical to torchvision, gradient equal up to float summation order), and the
batched assigners (bit-identical to the per-image ones), sampler (same quotas, uniform) and group building."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import roi_align as tv_roi_align

from pipeline.models.aux_heads.base import AuxPositives
from pipeline.models.aux_heads.fcos import FCOSAssigner, fcos_points, fcos_regress_ranges
from pipeline.models.aux_heads.roi_head import RoIHead, multi_level_roi_align
from pipeline.models.aux_queries.groups import build_aux_groups
from pipeline.models.layers.roi_align import roi_align
from pipeline.models.task_modules.anchors import cached_grid_anchors, cached_valid_flags, grid_anchors, valid_flags
from pipeline.models.task_modules.atss_assigner import ATSSAssigner
from pipeline.models.task_modules.batching import pad_gts
from pipeline.models.task_modules.max_iou_assigner import MaxIoUAssigner
from pipeline.models.task_modules.random_sampler import RandomSampler

SIZES = [(6, 7), (3, 4), (2, 2)]
STRIDES = [8, 16, 32]


def test_cached_grid_anchors_equal_and_reused():
    ref = grid_anchors(SIZES, STRIDES, ratios=(0.5, 1.0, 2.0), octave_base_scale=4, scales_per_octave=3)
    scales = [4 * 2 ** (i / 3) for i in range(3)]
    first = cached_grid_anchors(SIZES, STRIDES, scales, (0.5, 1.0, 2.0), "cpu")
    again = cached_grid_anchors([(6, 7), (3, 4), (2, 2)], (8, 16, 32), scales, [0.5, 1.0, 2.0], torch.device("cpu"))
    assert all(torch.equal(a, r) for a, r in zip(first, ref))
    assert all(a is b for a, b in zip(first, again))  # same tensors: the grid is built once per size
    other = cached_grid_anchors([(5, 7), (3, 4), (2, 2)], STRIDES, scales, (0.5, 1.0, 2.0), "cpu")
    assert other[0].shape[0] == 5 * 7 * 9 and other[0] is not first[0]


def test_cached_anchors_built_under_inference_mode_work_with_autograd():
    with torch.inference_mode():
        (a,) = cached_grid_anchors([(3, 3)], [64], (8.0,), (1.0,), "cpu")
    assert not a.is_inference()
    w = torch.ones(1, requires_grad=True)
    (a * w).sum().backward()  # would raise for an inference tensor saved for backward
    assert w.grad is not None


def test_cached_valid_flags_equal():
    for pad in [(17, 9), (10**9, 10**9)]:
        ref = valid_flags(SIZES, STRIDES, pad, 9)
        got = cached_valid_flags(SIZES, STRIDES, pad, 9, "cpu")
        assert all(torch.equal(g, r) for g, r in zip(got, ref))
        assert all(g is h for g, h in zip(got, cached_valid_flags(SIZES, STRIDES, pad, 9, "cpu")))


def _rois(n: int, batch: int, gen: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen) * 150 - 20  # some boxes start or end outside the map
    wh = torch.rand(n, 2, generator=gen) * 100
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[:2, 2:] = boxes[:2, :2] - 1.0  # degenerate (negative size): empty sampling grid
    return torch.cat([torch.randint(0, batch, (n, 1), generator=gen).float(), boxes], 1)


@pytest.mark.parametrize(("aligned", "sampling_ratio"), [(True, 0), (False, 0), (True, 2)])
def test_roi_align_matches_torchvision(aligned: bool, sampling_ratio: int):
    gen = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 6, 11, 13, generator=gen)
    rois = _rois(30, 2, gen)
    ours_in, ref_in = feat.clone().requires_grad_(), feat.clone().requires_grad_()
    ours = roi_align(ours_in, rois, 7, 1 / 8, sampling_ratio, aligned)
    ref = tv_roi_align(ref_in, rois, 7, spatial_scale=1 / 8, sampling_ratio=sampling_ratio, aligned=aligned)
    assert torch.equal(ours, ref)  # torchvision's own forward kernel
    grad = torch.randn(ref.shape, generator=gen)
    ours.backward(grad)
    ref.backward(grad)
    assert ref_in.grad.abs().max() > 1.0  # the comparison is not vacuous
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=1e-5, atol=1e-5)


def test_multi_level_roi_align_single_level_shortcut_is_exact():
    gen = torch.Generator().manual_seed(1)
    feats = [torch.randn(2, 4, 16 // 2**i, 16 // 2**i, generator=gen) for i in range(3)]
    small = torch.tensor([[0, 1.0, 1.0, 9.0, 9.0], [1, 2.0, 3.0, 12.0, 11.0]])  # all on level 0
    out = multi_level_roi_align(feats, small, (4, 8, 16), output_size=7, finest_scale=56.0)
    ref = tv_roi_align(feats[0], small, 7, spatial_scale=1 / 4, sampling_ratio=0, aligned=True)
    assert torch.equal(out, ref)


# ------------------------------------------------------------------ batched assignment, sampling, group building


def _gt_batch(seed: int, counts: list[int], grid: bool) -> list[torch.Tensor]:
    """Per image (G_i, 4) xyxy boxes in a 256 x 320 image; grid=True puts them on the stride-8 grid (distance and
    IoU ties between anchors), and a duplicated GT makes a tie between GTs."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in counts:
        if grid:
            xy = torch.randint(0, 30, (n, 2), generator=g).float() * 8
            wh = torch.randint(1, 12, (n, 2), generator=g).float() * 8
        else:
            xy = torch.rand(n, 2, generator=g) * 250
            wh = torch.rand(n, 2, generator=g) * 100 + 2
        boxes = torch.cat([xy, xy + wh], 1)
        if n >= 2:
            boxes[1] = boxes[0]
        out.append(boxes)
    return out


def _labels(gts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.arange(g.shape[0]) + 1 for g in gts]


@pytest.mark.parametrize(("seed", "grid"), [(0, True), (1, False), (2, True), (3, False)])
def test_atss_assign_batch_equals_per_image_assign(seed: int, grid: bool):
    levels = grid_anchors([(32, 40), (16, 20), (8, 10), (4, 5)], [8, 16, 32, 64], scales=(8,), ratios=(1.0,))
    anchors, num_level = torch.cat(levels), [a.shape[0] for a in levels]
    gts = _gt_batch(seed, [5, 0, 7], grid)
    assigner = ATSSAssigner(9)
    res = assigner.assign_batch(anchors, num_level, *pad_gts(gts, _labels(gts)))
    assert int((res.gt_inds > 0).sum()) > 10  # not vacuous
    for i, (gt, lab) in enumerate(zip(gts, _labels(gts))):
        ref = assigner.assign(anchors, num_level, gt, lab)
        assert torch.equal(res.gt_inds[i], ref.gt_inds) and torch.equal(res.labels[i], ref.labels)
        assert torch.equal(res.max_overlaps[i], ref.max_overlaps)


def test_atss_head_assigns_a_batch_of_equal_pads_at_once(monkeypatch: pytest.MonkeyPatch):
    """Images with the same padded extent (always with pad_size_divisor 0) take the batched path, whose targets
    equal the per-image `get_targets` (which a batch of B > 1 used to fall back to)."""
    from pipeline.models.aux_heads.atss import ATSSHead
    from pipeline.models.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
    from pipeline.models.task_modules.anchors import cached_valid_flags

    sizes, strides = [(32, 40), (16, 20), (8, 10), (4, 5)], (8, 16, 32, 64)
    head = ATSSHead(num_classes=8, in_channels=32, feat_channels=32, strides=strides)
    feats = [torch.randn(3, 32, h, w, generator=torch.Generator().manual_seed(i)) for i, (h, w) in enumerate(sizes)]
    gts = _gt_batch(0, [5, 0, 7], grid=True)
    img_sizes = torch.tensor([[256, 320]] * 3)
    factor = torch.tensor([320.0, 256.0, 320.0, 256.0])
    targets = [{"boxes": box_xyxy_to_cxcywh(g / factor), "labels": lab} for g, lab in zip(gts, _labels(gts))]
    per_image = head.get_targets
    monkeypatch.setattr(head, "get_targets", lambda *a: pytest.fail("per-image assignment for equal pads"))
    _, pos = head.forward_train(feats, targets, img_sizes)
    anchors = torch.cat(cached_grid_anchors(sizes, strides, (8.0,), (1.0,), "cpu"))
    flags = cached_valid_flags(sizes, strides, (10**9, 10**9), 1, "cpu")
    num_level = [h * w for h, w in sizes]
    for i, t in enumerate(targets):
        gt_xyxy = box_cxcywh_to_xyxy(t["boxes"]) * factor
        labels, _, tgt, _ = per_image(anchors, num_level, flags, gt_xyxy, t["labels"])
        assert torch.equal(pos.labels[i], labels) and torch.equal(pos.targets[i], tgt)
    assert int((pos.labels[0] < 8).sum()) > 5  # not vacuous


@pytest.mark.parametrize("cfg", [(0.7, 0.3, 0.3, True), (0.5, 0.5, 0.5, False), (0.5, 0.4, 0.0, True)])
def test_max_iou_assign_batch_equals_per_image_assign_on_valid_priors(cfg: tuple):
    levels = grid_anchors([(16, 20), (8, 10), (4, 5)], [16, 32, 64], ratios=(0.5, 1.0, 2.0), octave_base_scale=4,
                          scales_per_octave=3)  # fmt: skip
    priors = torch.cat(levels)
    assigner = MaxIoUAssigner(*cfg)
    for seed, grid in [(0, True), (1, False)]:
        gts = _gt_batch(seed, [4, 0, 6], grid)
        prior_valid = torch.rand(3, priors.shape[0], generator=torch.Generator().manual_seed(seed)) > 0.3
        res = assigner.assign_batch(priors, *pad_gts(gts, _labels(gts)), prior_valid)
        assert int((res.gt_inds > 0).sum()) >= 3  # not vacuous
        for i, (gt, lab) in enumerate(zip(gts, _labels(gts))):
            v = prior_valid[i].nonzero().squeeze(1)
            ref = assigner.assign(priors[v], gt, lab)
            assert torch.equal(res.gt_inds[i, v], ref.gt_inds) and torch.equal(res.labels[i, v], ref.labels)
            assert torch.equal(res.max_overlaps[i, v], ref.max_overlaps)
            assert (res.gt_inds[i][~prior_valid[i]] == -1).all()  # invalid priors are never sampled


def test_sample_masks_quotas_candidates_and_uniformity():
    gt_inds = torch.full((4, 3000), -1)
    gt_inds[0, :300], gt_inds[0, 300:1300] = 1, 0  # quota-bound positives
    gt_inds[1, :10], gt_inds[1, 10:1010] = 2, 0  # few positives: more negatives
    gt_inds[2, :1000] = 0  # no positive
    gt_inds[3, :10], gt_inds[3, 10:30] = 1, 0  # fewer candidates than the quota
    gt_inds = gt_inds[:, torch.randperm(3000, generator=torch.Generator().manual_seed(0))]
    pos, neg = RandomSampler(256, 0.5).sample_masks(gt_inds, torch.Generator().manual_seed(1))
    assert pos.sum(1).tolist() == [128, 10, 0, 10] and neg.sum(1).tolist() == [128, 246, 256, 20]  # as `sample`
    assert bool((gt_inds[pos] > 0).all()) and bool((gt_inds[neg] == 0).all())
    # every positive equally likely: 2 of 20 per draw -> 0.1 each
    few = torch.tensor([[1] * 20 + [0] * 5]).expand(3000, -1)
    p, _ = RandomSampler(8, 0.25).sample_masks(few, torch.Generator().manual_seed(2))
    freq = p[:, :20].float().mean(0)
    assert p.sum(1).eq(2).all() and (freq - 0.1).abs().max() < 0.025


def test_sample_rois_equals_per_image_sampling_when_everything_is_taken():
    """With quotas above the candidate counts the sampler is deterministic: the batched RoI sampling must give
    exactly the per-image `assign` + `sample` rows, image after image, [positives, negatives] in index order."""
    take_all = RandomSampler(10**6, 0.5, add_gt_as_proposals=True)
    head = RoIHead(3, MaxIoUAssigner(0.5, 0.5, 0.5, match_low_quality=False), take_all, in_channels=8, fc_dim=16)
    gts = _gt_batch(4, [3, 0, 2], grid=False)
    labels = [torch.tensor([0, 2, 1]), torch.zeros(0, dtype=torch.long), torch.tensor([2, 2])]
    g = torch.Generator().manual_seed(5)
    props = []
    for gt, n in zip(gts, [40, 25, 0]):
        jitter = torch.rand(n, 4, generator=g) * 30 - 15
        base = gt[torch.randint(max(gt.shape[0], 1), (n,), generator=g)] if gt.shape[0] else torch.zeros(n, 4) + 50
        props.append(base + jitter)
    rois, roi_labels, targets, img = head.sample_rois(props, gts, labels)
    start = 0
    for i, (p, gt, lab) in enumerate(zip(props, gts, labels)):
        s = take_all.sample(head.assigner.assign(p, gt, lab), p, gt, lab)
        n_pos, n_neg = s.pos_inds.numel(), s.neg_inds.numel()
        end = start + n_pos + n_neg
        assert (img[start:end] == i).all()
        assert torch.equal(rois[start:end], torch.cat([s.pos_priors, s.neg_priors]))
        assert torch.equal(roi_labels[start:end], torch.cat([s.pos_labels, torch.full((n_neg,), 3)]))
        assert torch.equal(targets[start:end], torch.cat([s.pos_gt_boxes, torch.zeros(n_neg, 4)]))
        start = end
    assert start == rois.shape[0] and int((roi_labels < 3).sum()) >= 5


def test_fcos_assign_batch_equals_per_image_assign():
    strides = (8, 16, 32, 64)
    level_points = fcos_points([(32, 40), (16, 20), (8, 10), (4, 5)], strides, torch.device("cpu"))
    points = torch.cat(level_points)
    point_strides = torch.cat([p.new_full((p.shape[0],), float(s)) for p, s in zip(level_points, strides)])
    ranges = torch.cat(
        [p.new_tensor(r).expand(p.shape[0], 2) for p, r in zip(level_points, fcos_regress_ranges(strides))]
    )
    gts = _gt_batch(6, [4, 0, 5], grid=True)
    assigner = FCOSAssigner()
    labels, idx = assigner.assign_batch(points, point_strides, ranges, *pad_gts(gts, _labels(gts)), 9)
    assert int((idx >= 0).sum()) > 5
    for i, (gt, lab) in enumerate(zip(gts, _labels(gts))):
        ref_labels, ref_idx = assigner.assign(points, point_strides, ranges, gt, lab, 9)
        assert torch.equal(labels[i], ref_labels) and torch.equal(idx[i], ref_idx)


def test_build_aux_groups_unequal_lengths_replacement_and_features():
    nc = 4
    coords = [torch.arange(40.0).view(10, 4) * torch.tensor([1.0, 1.0, 2.0, 2.0]) + 1, torch.ones(3, 4) * 2]
    coords[1][:, 2:] = 5.0
    labels = [torch.tensor([0, 1, 2, 3, 0, 1, 2, 4, 4, 4]), torch.tensor([1, 4, 4])]  # 7 + 1 positives
    targets = [c + 0.5 for c in coords]
    feats = [torch.arange(10.0)[:, None].repeat(1, 2), -torch.arange(1.0, 4)[:, None].repeat(1, 2)]
    feats = [f.requires_grad_() for f in feats]
    pos = AuxPositives("roi", coords, labels, targets, feats)
    group = build_aux_groups(
        pos, torch.tensor([[100, 100], [100, 100]]), nc, generator=torch.Generator().manual_seed(0)
    )
    assert group.boxes.shape == (2, 9, 4) and group.feats.shape == (2, 9, 2)
    # image 0: its 7 positives in index order, then its 2 negatives (7, 8 or 9; distinct)
    assert group.feats[0, :7, 0].tolist() == [0, 1, 2, 3, 4, 5, 6] and group.box_weights[0].sum() == 7
    assert len(set(group.feats[0, 7:, 0].tolist())) == 2 and set(group.feats[0, 7:, 0].tolist()) <= {7.0, 8.0, 9.0}
    # image 1: 1 positive, both negatives, then 6 negatives again (with replacement); every slot is real
    assert group.feats[1, 0, 0] == -1 and set(group.feats[1, 1:, 0].tolist()) == {-2.0, -3.0}
    assert group.label_weights[1].eq(1).all() and group.labels[1, 1:].eq(nc).all()
    assert group.feats[1, 1:3, 0].tolist() in ([-2.0, -3.0], [-3.0, -2.0])  # the distinct ones first
    group.feats.sum().backward()
    assert feats[0].grad[:7].eq(1).all() and feats[1].grad[0].eq(1).all()
