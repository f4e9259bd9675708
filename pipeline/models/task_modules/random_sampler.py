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
