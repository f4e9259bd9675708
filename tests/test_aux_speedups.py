"""Speed-ups of the auxiliary heads that must not change numbers: memoised anchors / valid flags, and RoIAlign's
vectorised CPU backward (forward bit-identical to torchvision, gradient equal up to float summation order)."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import roi_align as tv_roi_align

from pipeline.models.aux_heads.roi_head import multi_level_roi_align
from pipeline.models.layers.roi_align import roi_align
from pipeline.models.task_modules.anchors import cached_grid_anchors, cached_valid_flags, grid_anchors, valid_flags

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
