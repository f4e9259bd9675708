"""mmdet's RandomSampler: a fixed number of priors per image with an upper bound on the positive fraction."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.models.task_modules.assign_result import AssignResult


@dataclass
class SampledPriors:
    """What a RandomSampler picked for one image (mmdet `SamplingResult`).

    priors: (N', 4) xyxy the indices refer to (GT boxes first when they were added as proposals).
    pos_inds, neg_inds: (P,), (Q,) long, ascending. pos_gt_boxes: (P, 4) assigned GT xyxy. pos_labels: (P,) long.
    """

    priors: Tensor
    pos_inds: Tensor
    neg_inds: Tensor
    pos_gt_boxes: Tensor
    pos_labels: Tensor

    @property
    def avg_factor(self) -> int:
        """mmdet's normaliser for sampled losses: max(#pos, 1) + max(#neg, 1)."""
        return max(self.pos_inds.numel(), 1) + max(self.neg_inds.numel(), 1)

    @property
    def pos_priors(self) -> Tensor:
        return self.priors[self.pos_inds]

    @property
    def neg_priors(self) -> Tensor:
        return self.priors[self.neg_inds]


class RandomSampler:
    """mmdet `RandomSampler` (neg_pos_ub=-1): up to int(num * pos_fraction) random positives, then num - #pos random
    negatives (gt_inds == 0; ignored priors are never sampled). With add_gt_as_proposals the GT boxes are prepended
    to the priors and assigned to themselves first (mmdet `AssignResult.add_gt_`). Indices come back sorted.
    """

    def __init__(self, num: int, pos_fraction: float, add_gt_as_proposals: bool = False) -> None:
        if num < 1 or not 0.0 <= pos_fraction <= 1.0:
            raise ValueError(f"RandomSampler needs num >= 1 and pos_fraction in [0, 1], got {num}, {pos_fraction}")
        self.num = num
        self.pos_fraction = pos_fraction
        self.add_gt_as_proposals = add_gt_as_proposals

    @staticmethod
    def _choice(candidates: Tensor, num: int) -> Tensor:
        """Sorted random subset of at most `num` entries of `candidates` (all of them if there are fewer)."""
        if candidates.numel() > num:
            candidates = candidates[torch.randperm(candidates.numel(), device=candidates.device)[:num]]
        return candidates.unique()  # sorted, as mmdet's `.unique()`

    @torch.no_grad()
    def sample(self, assign: AssignResult, priors: Tensor, gt_boxes: Tensor, gt_labels: Tensor) -> SampledPriors:
        """assign: result for `priors` (N, 4); gt_boxes (G, 4) xyxy; gt_labels (G,) long."""
        gt_inds = assign.gt_inds
        labels = assign.labels
        if self.add_gt_as_proposals and gt_boxes.shape[0] > 0:
            priors = torch.cat([gt_boxes.to(priors.dtype), priors])
            gt_inds = torch.cat([torch.arange(1, gt_boxes.shape[0] + 1, device=gt_inds.device), gt_inds])
            labels = torch.cat([gt_labels.long(), labels])
        pos_inds = self._choice((gt_inds > 0).nonzero().squeeze(1), int(self.num * self.pos_fraction))
        neg_inds = self._choice((gt_inds == 0).nonzero().squeeze(1), self.num - pos_inds.numel())
        pos_gt = gt_inds[pos_inds] - 1
        pos_gt_boxes = gt_boxes[pos_gt] if gt_boxes.shape[0] > 0 else gt_boxes.new_zeros((0, 4))
        return SampledPriors(priors, pos_inds, neg_inds, pos_gt_boxes.to(priors.dtype), labels[pos_inds])

    @torch.no_grad()
    def sample_masks(self, gt_inds: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """The sampling of `sample` for a batch at once: gt_inds (B, N) (-1 ignored, 0 negative, i + 1 positive,
        GT rows already prepended when add_gt_as_proposals) -> (pos_mask, neg_mask) (B, N) bool.

        Per image the same quotas as `sample` (up to int(num * pos_fraction) positives, then num - #pos negatives),
        each a uniformly random subset: the candidates with the largest random keys (one top-k over the batch
        instead of one randperm per image; same distribution, different draws for a given seed)."""
        b, n = gt_inds.shape
        num_pos = int(self.num * self.pos_fraction)
        keys = torch.rand((2, b, n), generator=generator, device=gt_inds.device)
        pos_mask = self._top(torch.where(gt_inds > 0, keys[0], -1.0), torch.full((b,), num_pos, device=keys.device),
                             num_pos)
        neg_quota = self.num - pos_mask.sum(1)
        neg_mask = self._top(torch.where(gt_inds == 0, keys[1], -1.0), neg_quota, self.num)
        return pos_mask, neg_mask

    @staticmethod
    def _top(keys: Tensor, quota: Tensor, bound: int) -> Tensor:
        """keys (B, N) with -1 for non-candidates, quota (B,) <= bound (a Python int, so that the top-k size is
        not read back from the device) -> (B, N) bool: per row the min(quota, #candidates) candidates with the
        largest keys."""
        b, n = keys.shape
        k = min(bound if b else 0, n)
        mask = torch.zeros_like(keys, dtype=torch.bool)
        if k <= 0:
            return mask
        top, idx = keys.topk(k, dim=1)  # (B, k), descending
        take = (top >= 0) & (torch.arange(k, device=keys.device)[None] < quota[:, None])
        return mask.scatter_(1, idx, take)
