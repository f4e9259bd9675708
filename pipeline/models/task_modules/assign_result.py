"""The result of a box assigner: which ground truth (if any) each prior is assigned to."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class AssignResult:
    """gt_inds: (N,) long, 0 = negative, i + 1 = assigned to GT i. max_overlaps: (N,) IoU with the assigned GT
    (-INF for negatives when GTs exist, 0 without GTs). labels: (N,) long, class of the assigned GT, -1 otherwise."""

    num_gts: int
    gt_inds: Tensor
    max_overlaps: Tensor
    labels: Tensor

    @property
    def pos_mask(self) -> Tensor:
        return self.gt_inds > 0
