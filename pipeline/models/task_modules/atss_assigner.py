"""Anchor-to-GT assigners of the auxiliary heads.

ATSSAssigner: Adaptive Training Sample Selection (Zhang et al. 2020), with the numerics of mmdet's
`ATSSAssigner` (v3 `mmdet/models/task_modules/assigners/atss_assigner.py`; v2 is the same computation):

1. IoU and centre distance between every anchor and every GT.
2. Per level, the min(topk, anchors in that level) anchors whose centres are nearest each GT are candidates.
3. Per GT, IoU threshold = mean + std (unbiased) of its candidates' IoUs.
4. A candidate is positive if IoU >= threshold and its centre lies inside the GT (min of l, t, r, b > 0.01).
5. An anchor positive for several GTs goes to the one with the highest IoU (first index on exact ties).

Ignore boxes (`ignore_iof_thr`) are not supported: the Co-DETR configs never set them (mmdet default -1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from pipeline.models.box_ops import box_iou
from pipeline.models.task_modules.assign_result import AssignResult

_INF = 100000000.0


class ATSSAssigner:
    """ATSS assignment of anchors to GT boxes (see the module docstring).

    assign(anchors (N, 4) xyxy, num_level_anchors [N_0, ..., N_{L-1}] (sum N, level-major order),
           gt_boxes (G, 4) xyxy, gt_labels (G,) long) -> AssignResult.
    """

    def __init__(self, topk: int = 9) -> None:
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        self.topk = topk

    @torch.no_grad()
    def assign(
        self, anchors: Tensor, num_level_anchors: Sequence[int], gt_boxes: Tensor, gt_labels: Tensor
    ) -> AssignResult:
        num_gt, num_anchors = gt_boxes.shape[0], anchors.shape[0]
        if sum(num_level_anchors) != num_anchors:
            raise ValueError(f"num_level_anchors sum to {sum(num_level_anchors)}, expected {num_anchors} anchors")
        anchors = anchors[:, :4]
        gt_inds = anchors.new_zeros((num_anchors,), dtype=torch.long)
        labels = anchors.new_full((num_anchors,), -1, dtype=torch.long)
        if num_gt == 0 or num_anchors == 0:
            return AssignResult(num_gt, gt_inds, anchors.new_zeros((num_anchors,)), labels)

        overlaps = box_iou(anchors, gt_boxes)  # (N, G); = mmdet bbox_overlaps for positive-area anchors
        gt_ctr = torch.stack(((gt_boxes[:, 0] + gt_boxes[:, 2]) / 2.0, (gt_boxes[:, 1] + gt_boxes[:, 3]) / 2.0), 1)
        anc_cx = (anchors[:, 0] + anchors[:, 2]) / 2.0
        anc_cy = (anchors[:, 1] + anchors[:, 3]) / 2.0
        anc_ctr = torch.stack((anc_cx, anc_cy), dim=1)
        distances = (anc_ctr[:, None, :] - gt_ctr[None, :, :]).pow(2).sum(-1).sqrt()  # (N, G)

        # candidates: the k nearest anchor centres per level and GT
        candidates = []
        start = 0
        for n in num_level_anchors:
            k = min(self.topk, n)
            _, idx = distances[start : start + n].topk(k, dim=0, largest=False)  # (k, G)
            candidates.append(idx + start)
            start += n
        cand = torch.cat(candidates, dim=0)  # (K, G)

        gt_range = torch.arange(num_gt, device=anchors.device)
        cand_iou = overlaps[cand, gt_range]  # (K, G)
        thr = cand_iou.mean(0) + cand_iou.std(0)  # unbiased std, like mmdet
        is_pos = cand_iou >= thr[None, :]

        # the candidate's centre must lie inside the GT
        cx, cy = anc_cx[cand], anc_cy[cand]  # (K, G)
        ltrb = torch.stack(
            [cx - gt_boxes[:, 0], cy - gt_boxes[:, 1], gt_boxes[:, 2] - cx, gt_boxes[:, 3] - cy], dim=1
        )  # (K, 4, G)
        is_pos = is_pos & (ltrb.min(dim=1).values > 0.01)

        # one GT per anchor: the highest IoU among the GTs it is positive for
        flat_idx = (cand + gt_range[None, :] * num_anchors).reshape(-1)  # index into the (G, N) transpose
        keep = flat_idx[is_pos.reshape(-1)]
        overlaps_t = overlaps.t().reshape(-1)
        masked = torch.full_like(overlaps_t, -_INF)
        masked[keep] = overlaps_t[keep]
        masked = masked.view(num_gt, num_anchors).t()  # (N, G)
        max_overlaps, argmax = masked.max(dim=1)
        pos = max_overlaps != -_INF
        gt_inds[pos] = argmax[pos] + 1
        labels[pos] = gt_labels[argmax[pos]].long()
        return AssignResult(num_gt, gt_inds, max_overlaps, labels)

    @torch.no_grad()
    def assign_batch(
        self, anchors: Tensor, num_level_anchors: Sequence[int], gt_boxes: Tensor, gt_labels: Tensor,
        gt_valid: Tensor,
    ) -> AssignResult:  # fmt: skip
        """`assign` for a batch of images sharing the anchors, without a per-image loop; equal to calling `assign`
        on each image's valid GTs (same floats: every step is per (anchor, GT) or per GT column).

        anchors (N, 4) xyxy, num_level_anchors as `assign`; gt_boxes (B, G, 4) xyxy, gt_labels (B, G) long and
        gt_valid (B, G) bool: each image's GTs padded to G (valid rows first). Returns an AssignResult whose
        gt_inds, max_overlaps, labels are (B, N) (gt_inds i + 1 = the image's GT i) and num_gts = G.
        """
        b, num_gt, num_anchors = gt_boxes.shape[0], gt_boxes.shape[1], anchors.shape[0]
        if sum(num_level_anchors) != num_anchors:
            raise ValueError(f"num_level_anchors sum to {sum(num_level_anchors)}, expected {num_anchors} anchors")
        anchors = anchors[:, :4]
        gt_inds = anchors.new_zeros((b, num_anchors), dtype=torch.long)
        labels = anchors.new_full((b, num_anchors), -1, dtype=torch.long)
        if num_gt == 0 or num_anchors == 0:
            return AssignResult(num_gt, gt_inds, anchors.new_zeros((b, num_anchors)), labels)

        overlaps = box_iou(anchors, gt_boxes)  # (B, N, G), elementwise as `assign`
        gt_ctr = torch.stack(((gt_boxes[..., 0] + gt_boxes[..., 2]) / 2.0, (gt_boxes[..., 1] + gt_boxes[..., 3]) / 2.0),
                             -1)  # (B, G, 2)  # fmt: skip
        anc_cx = (anchors[:, 0] + anchors[:, 2]) / 2.0
        anc_cy = (anchors[:, 1] + anchors[:, 3]) / 2.0
        anc_ctr = torch.stack((anc_cx, anc_cy), dim=1)
        distances = (anc_ctr[None, :, None, :] - gt_ctr[:, None, :, :]).pow(2).sum(-1).sqrt()  # (B, N, G)

        candidates = []
        start = 0
        for n in num_level_anchors:
            k = min(self.topk, n)
            _, idx = distances[:, start : start + n].topk(k, dim=1, largest=False)  # (B, k, G)
            candidates.append(idx + start)
            start += n
        cand = torch.cat(candidates, dim=1)  # (B, K, G)

        cand_iou = overlaps.gather(1, cand)  # (B, K, G)
        thr = cand_iou.mean(1) + cand_iou.std(1)  # (B, G)
        is_pos = cand_iou >= thr[:, None, :]
        cx, cy = anc_cx[cand], anc_cy[cand]  # (B, K, G)
        g = gt_boxes[:, None]  # (B, 1, G, 4)
        ltrb = torch.stack([cx - g[..., 0], cy - g[..., 1], g[..., 2] - cx, g[..., 3] - cy], dim=2)  # (B, K, 4, G)
        is_pos = is_pos & (ltrb.min(dim=2).values > 0.01) & gt_valid[:, None, :]

        masked = torch.full_like(overlaps, -_INF)  # (B, N, G); the K candidates of a GT are distinct anchors
        masked.scatter_(1, cand, torch.where(is_pos, cand_iou, cand_iou.new_tensor(-_INF)))
        max_overlaps, argmax = masked.max(dim=2)  # first GT on exact ties, padded GTs last
        pos = max_overlaps != -_INF
        gt_inds = torch.where(pos, argmax + 1, gt_inds)  # where(), not mask assignment: no host sync
        labels = torch.where(pos, gt_labels.gather(1, argmax).long(), labels)
        max_overlaps = torch.where(gt_valid.any(1, keepdim=True), max_overlaps, max_overlaps.new_zeros(()))
        return AssignResult(num_gt, gt_inds, max_overlaps, labels)
