"""HungarianMatcher: cost terms by hand, optimality against brute force, empty and over-full cases."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pipeline.models.query_head.matcher import HungarianMatcher, focal_loss_cost


def _case(q: int, n: int, nc: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(q, nc, generator=g) * 2
    boxes = torch.rand(q, 4, generator=g) * 0.5 + 0.2  # cxcywh in (0.2, 0.7)
    gt_labels = torch.randint(0, nc, (n,), generator=g)
    gt_boxes = torch.rand(n, 4, generator=g) * 0.5 + 0.2
    return logits, boxes, gt_labels, gt_boxes


def test_focal_cost_hand_value():
    x, alpha, gamma, eps = 0.3, 0.25, 2.0, 1e-12
    p = 1 / (1 + math.exp(-x))
    pos = -math.log(p + eps) * alpha * (1 - p) ** gamma
    neg = -math.log(1 - p + eps) * (1 - alpha) * p**gamma
    cost = focal_loss_cost(torch.tensor([[0.0, x]]), torch.tensor([1, 1, 0]))
    assert cost.shape == (1, 3)
    assert cost[0, 0].item() == pytest.approx(pos - neg, rel=1e-5)
    assert cost[0, 0].item() == cost[0, 1].item()


def test_cost_matrix_terms_and_pixel_giou():
    m = HungarianMatcher()
    logits = torch.zeros(1, 2)
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    gt = torch.tensor([[0.6, 0.5, 0.2, 0.2]])
    # focal cost at logit 0 (p = 0.5) is the same for every class; L1 = 0.1; GIoU on pixels depends on (h, w)
    p = 0.5
    focal = -math.log(p + 1e-12) * 0.25 * (1 - p) ** 2 + math.log(1 - p + 1e-12) * 0.75 * p**2
    # (h, w) = (100, 200): boxes 40x20 px at x 80..120 and 100..140: inter 20x20, union 1200, enclose 60x20
    giou = 400 / 1200 - (1200 - 1200) / 1200
    expected = 2 * focal + 5 * 0.1 - 2 * giou
    cost = m.cost_matrix(logits, pred, torch.tensor([1]), gt, (100, 200))
    assert cost.item() == pytest.approx(expected, abs=1e-5)
    # (G)IoU is invariant to per-axis scaling, so the pixel factor changes only rounding
    cost_square = m.cost_matrix(logits, pred, torch.tensor([1]), gt, (200, 200))
    assert cost_square.item() == pytest.approx(expected, abs=1e-5)


def _brute_force(cost: torch.Tensor) -> float:
    q, n = cost.shape
    best = math.inf
    if q >= n:
        for rows in itertools.permutations(range(q), n):
            best = min(best, sum(cost[r, c].item() for c, r in enumerate(rows)))
    else:
        for cols in itertools.permutations(range(n), q):
            best = min(best, sum(cost[r, c].item() for r, c in enumerate(cols)))
    return best


@pytest.mark.parametrize(("q", "n", "seed"), [(4, 3, 0), (3, 3, 1), (6, 2, 2), (2, 4, 3), (5, 5, 4)])
def test_match_is_optimal_against_brute_force(q, n, seed):
    m = HungarianMatcher()
    logits, boxes, gt_labels, gt_boxes = _case(q, n, seed=seed)
    cost = m.cost_matrix(logits, boxes, gt_labels, gt_boxes, (480, 640))
    qi, gi = m.match(logits, boxes, gt_labels, gt_boxes, (480, 640))
    assert qi.dtype == torch.long and gi.dtype == torch.long
    assert len(qi) == len(gi) == min(q, n)
    assert len(set(qi.tolist())) == len(qi) and len(set(gi.tolist())) == len(gi)
    assert torch.equal(qi, qi.sort().values)  # sorted by query, as mmdet lists positives
    assert cost[qi, gi].sum().item() == pytest.approx(_brute_force(cost), abs=1e-4)


def test_match_prefers_the_obvious_pairs():
    m = HungarianMatcher()
    gt_boxes = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.8, 0.7, 0.2, 0.3]])
    gt_labels = torch.tensor([3, 1])
    boxes = torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.8, 0.7, 0.2, 0.3], [0.2, 0.2, 0.1, 0.1]])
    logits = torch.full((3, 4), -3.0)
    logits[1, 1] = 3.0
    logits[2, 3] = 3.0
    qi, gi = m.match(logits, boxes, gt_labels, gt_boxes, (100, 100))
    assert qi.tolist() == [1, 2] and gi.tolist() == [1, 0]


def test_match_zero_gt_and_zero_queries():
    m = HungarianMatcher()
    logits, boxes, _, _ = _case(5, 0)
    qi, gi = m.match(logits, boxes, torch.zeros(0, dtype=torch.long), torch.zeros(0, 4), (32, 32))
    assert qi.shape == (0,) and gi.shape == (0,) and qi.dtype == torch.long
    qi, gi = m.match(torch.zeros(0, 5), torch.zeros(0, 4), torch.tensor([1]), torch.rand(1, 4), (32, 32))
    assert qi.numel() == 0 and gi.numel() == 0


def test_match_without_grad_and_rejects_nan():
    m = HungarianMatcher()
    logits, boxes, gt_labels, gt_boxes = _case(4, 2)
    logits.requires_grad_(True)
    qi, _ = m.match(logits, boxes, gt_labels, gt_boxes, (64, 64))
    assert not qi.requires_grad
    bad = boxes.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        m.match(logits.detach(), bad, gt_labels, gt_boxes, (64, 64))
