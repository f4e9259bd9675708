"""Hungarian one-to-one matcher of Co-DINO / DINO (mmdet `HungarianAssigner` with its three costs) [spec 4.1].

cost[q, g] = FocalLossCost(weight 2) + BBoxL1Cost(weight 5, normalised cxcywh) + IoUCost(-GIoU, weight 2,
pixel xyxy), summed in that order, then scipy's `linear_sum_assignment` on the float32 cost moved to the CPU.

Difference from the mmdet 3.x port, on purpose: mmdet 3.x converts the predicted boxes to pixel xyxy and back
before the L1 cost; we use the normalised cxcywh directly (the authors' mmdet 2.x path). The costs differ by
float rounding only (~1e-7), which can change the assignment only on exact near-ties.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from pipeline.models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

__all__ = ["HungarianMatcher", "focal_loss_cost"]


def focal_loss_cost(
    logits: Tensor, gt_labels: Tensor, alpha: float = 0.25, gamma: float = 2.0, eps: float = 1e-12
) -> Tensor:
    """mmdet `FocalLossCost` (unweighted). logits: (Q, nc); gt_labels: (N,) -> (Q, N).

    p = sigmoid(logits); neg = -log(1 - p + eps) * (1 - alpha) * p^gamma;
    pos = -log(p + eps) * alpha * (1 - p)^gamma; cost = pos[:, gt] - neg[:, gt].
    """
    p = logits.sigmoid()
    neg = -(1 - p + eps).log() * (1 - alpha) * p.pow(gamma)
    pos = -(p + eps).log() * alpha * (1 - p).pow(gamma)
    return pos[:, gt_labels] - neg[:, gt_labels]


class HungarianMatcher:
    """One-to-one assignment of Q predictions to N ground-truth boxes of one image (no gradients)."""

    def __init__(
        self,
        cls_cost: float = 2.0,
        l1_cost: float = 5.0,
        giou_cost: float = 2.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
        eps: float = 1e-12,
    ) -> None:
        self.cls_cost = cls_cost
        self.l1_cost = l1_cost
        self.giou_cost = giou_cost
        self.alpha = alpha
        self.gamma = gamma
        self.eps = eps

    def __repr__(self) -> str:
        return (
            f"HungarianMatcher(cls_cost={self.cls_cost}, l1_cost={self.l1_cost}, giou_cost={self.giou_cost}, "
            f"alpha={self.alpha}, gamma={self.gamma})"
        )

    @torch.no_grad()
    def cost_matrix(
        self,
        logits: Tensor,
        boxes: Tensor,
        gt_labels: Tensor,
        gt_boxes: Tensor,
        img_size: Sequence[int] | Tensor,
    ) -> Tensor:
        """(Q, N) cost. logits: (Q, nc); boxes: (Q, 4) cxcywh normalised; gt_labels: (N,);
        gt_boxes: (N, 4) cxcywh normalised; img_size: (h, w) of the unpadded network input."""
        h, w = (float(v) for v in img_size)
        factor = boxes.new_tensor([w, h, w, h]).unsqueeze(0)
        cls = focal_loss_cost(logits, gt_labels, self.alpha, self.gamma, self.eps) * self.cls_cost
        l1 = torch.cdist(boxes, gt_boxes, p=1) * self.l1_cost
        giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes) * factor, box_cxcywh_to_xyxy(gt_boxes) * factor)
        return cls + l1 + giou * self.giou_cost

    @torch.no_grad()
    def match(
        self,
        logits: Tensor,
        boxes: Tensor,
        gt_labels: Tensor,
        gt_boxes: Tensor,
        img_size: Sequence[int] | Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Optimal assignment. Shapes as in `cost_matrix`.

        Returns (query_idx (K,), gt_idx (K,)) long on logits' device, K = min(Q, N), sorted by query index
        (the order in which mmdet lists positives). N = 0 or Q = 0 gives two empty tensors.
        """
        if boxes.shape[-1] != 4 or gt_boxes.shape[-1] != 4 or logits.shape[0] != boxes.shape[0]:
            raise ValueError(
                f"match needs logits (Q, nc), boxes (Q, 4), gt_boxes (N, 4); got {tuple(logits.shape)}, "
                f"{tuple(boxes.shape)}, {tuple(gt_boxes.shape)}"
            )
        device = logits.device
        if gt_boxes.shape[0] == 0 or boxes.shape[0] == 0:
            empty = torch.empty(0, dtype=torch.long, device=device)
            return empty, empty.clone()
        cost = self.cost_matrix(logits, boxes, gt_labels, gt_boxes, img_size).detach().cpu()
        if cost.dtype not in (torch.float32, torch.float64):
            cost = cost.float()  # half / bfloat16 have no numpy view
        if not torch.isfinite(cost).all():
            raise ValueError(
                "HungarianMatcher: the cost matrix has NaN/inf entries (non-finite logits or boxes?)"
            )
        rows, cols = linear_sum_assignment(cost.numpy())
        query_idx = torch.as_tensor(rows, dtype=torch.long, device=device)
        gt_idx = torch.as_tensor(cols, dtype=torch.long, device=device)
        return query_idx, gt_idx
