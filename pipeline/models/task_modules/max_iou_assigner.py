"""mmdet's MaxIoUAssigner (RPN and RoI targets of the Faster R-CNN aux head, CO_DETR_SPEC.md 2.3)."""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.models.box_ops import box_iou
from pipeline.models.task_modules.assign_result import AssignResult


class MaxIoUAssigner:
    """mmdet `MaxIoUAssigner` (gt_max_assign_all=True, no ignore boxes).

    assign(priors (N, 4) xyxy, gt_boxes (G, 4) xyxy, gt_labels (G,)) -> AssignResult with gt_inds (N,):
      -1 = ignored (IoU in [neg_iou, pos_iou)), 0 = negative, i + 1 = GT i. Steps, as mmdet:
      1. every prior starts ignored; priors whose best IoU is in [0, neg_iou) become negatives;
      2. priors whose best IoU >= pos_iou go to their best GT (the first one on exact ties);
      3. match_low_quality: for each GT whose best IoU >= min_pos_iou, every prior with exactly that IoU goes to the
         GT (overwriting step 2; GTs are visited in order, so the last GT wins a shared prior).
    Without GTs every prior is negative.
    """

    def __init__(
        self, pos_iou: float, neg_iou: float, min_pos_iou: float = 0.0, match_low_quality: bool = True
    ) -> None:
        if not 0.0 <= neg_iou <= pos_iou <= 1.0:
            raise ValueError(f"MaxIoUAssigner needs 0 <= neg_iou ({neg_iou}) <= pos_iou ({pos_iou}) <= 1")
        self.pos_iou = pos_iou
        self.neg_iou = neg_iou
        self.min_pos_iou = min_pos_iou
        self.match_low_quality = match_low_quality

    @torch.no_grad()
    def assign(self, priors: Tensor, gt_boxes: Tensor, gt_labels: Tensor) -> AssignResult:
        num_gts, num_priors = gt_boxes.shape[0], priors.shape[0]
        gt_inds = priors.new_full((num_priors,), -1, dtype=torch.long)
        labels = priors.new_full((num_priors,), -1, dtype=torch.long)
        if num_gts == 0 or num_priors == 0:
            if num_gts == 0:
                gt_inds.fill_(0)
            return AssignResult(num_gts, gt_inds, priors.new_zeros((num_priors,)), labels)

        overlaps = box_iou(gt_boxes.float(), priors.float())  # (G, N), same floats as mmdet bbox_overlaps
        max_overlaps, argmax = overlaps.max(dim=0)  # per prior
        gt_max = overlaps.max(dim=1).values  # per GT
        gt_inds[(max_overlaps >= 0) & (max_overlaps < self.neg_iou)] = 0
        pos = max_overlaps >= self.pos_iou
        gt_inds[pos] = argmax[pos] + 1
        if self.match_low_quality:
            is_best = (overlaps == gt_max[:, None]) & (gt_max[:, None] >= self.min_pos_iou)  # (G, N)
            last_gt = num_gts - 1 - is_best.flip(0).to(torch.uint8).argmax(dim=0)  # last GT with is_best per prior
            gt_inds = torch.where(is_best.any(dim=0), last_gt + 1, gt_inds)
        pos = gt_inds > 0
        labels[pos] = gt_labels[gt_inds[pos] - 1].long()
        return AssignResult(num_gts, gt_inds, max_overlaps, labels)

    @torch.no_grad()
    def assign_batch(
        self, priors: Tensor, gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor, prior_valid: Tensor | None = None
    ) -> AssignResult:
        """`assign` for a batch of images without a per-image loop; equal to calling `assign` on each image's valid
        priors and valid GTs (same floats: IoUs are elementwise, maxima exact).

        priors (N, 4) shared or (B, N, 4) xyxy; gt_boxes (B, G, 4) xyxy, gt_labels (B, G), gt_valid (B, G) bool
        (each image's GTs padded to G); prior_valid (B, N) bool or None (all valid): an invalid prior comes back
        ignored (gt_inds -1) and plays no part in any GT's best IoU. Returns an AssignResult with (B, N) tensors.
        """
        b, num_gts = gt_boxes.shape[:2]
        num_priors = priors.shape[-2]
        if prior_valid is None:
            prior_valid = torch.ones((b, num_priors), dtype=torch.bool, device=priors.device)
        gt_inds = priors.new_full((b, num_priors), -1, dtype=torch.long)
        labels = priors.new_full((b, num_priors), -1, dtype=torch.long)
        no_gt = ~gt_valid.any(1, keepdim=True)  # (B, 1): every valid prior of such an image is negative
        if num_gts == 0 or num_priors == 0:
            gt_inds = torch.where(prior_valid, 0, gt_inds)
            return AssignResult(num_gts, gt_inds, priors.new_zeros((b, num_priors)), labels)

        overlaps = box_iou(gt_boxes.float(), priors.float())  # (B, G, N), elementwise as `assign`
        usable = gt_valid[:, :, None] & prior_valid[:, None, :]
        overlaps = torch.where(usable, overlaps, overlaps.new_tensor(-1.0))  # below any real IoU
        max_overlaps, argmax = overlaps.max(dim=1)  # (B, N) per prior, first GT on ties
        gt_max = overlaps.max(dim=2).values  # (B, G) per GT over its image's valid priors
        # torch.where, not bool-mask assignment: no data-dependent shapes (no host sync on a GPU)
        gt_inds = torch.where((max_overlaps >= 0) & (max_overlaps < self.neg_iou), 0, gt_inds)
        gt_inds = torch.where(max_overlaps >= self.pos_iou, argmax + 1, gt_inds)
        if self.match_low_quality:
            is_best = (overlaps == gt_max[:, :, None]) & (gt_max[:, :, None] >= self.min_pos_iou) & usable
            last_gt = num_gts - 1 - is_best.flip(1).to(torch.uint8).argmax(dim=1)  # (B, N)
            gt_inds = torch.where(is_best.any(dim=1), last_gt + 1, gt_inds)
        gt_inds = torch.where(no_gt & prior_valid, 0, gt_inds)
        labels = torch.where(gt_inds > 0, gt_labels.gather(1, (gt_inds - 1).clamp(min=0)).long(), labels)
        max_overlaps = torch.where(no_gt | ~prior_valid, max_overlaps.new_zeros(()), max_overlaps)
        return AssignResult(num_gts, gt_inds, max_overlaps, labels)
