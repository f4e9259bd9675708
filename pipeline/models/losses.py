"""Detection losses with mmdetection's numerics: QFL, sigmoid focal, L1, GIoU, and their reduction.

Every reduced loss follows mmdet's `weight_reduce_loss`: multiply by the element weight, then
`sum / (avg_factor + finfo(float32).eps)` when an avg_factor is given, else a plain mean. Loss weights
(e.g. 5.0 for L1) are applied by the caller: `w * l1_loss(...)` is the same float op as mmdet's
`loss_weight * (...)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss as tv_sigmoid_focal_loss

from pipeline.dist import reduce_mean  # the one owner of collectives; re-exported
from pipeline.models.box_ops import aligned_iou

__all__ = [
    "giou_loss",
    "l1_loss",
    "quality_focal_loss",
    "reduce_mean",
    "sigmoid_focal_loss",
    "weight_reduce_loss",
]

_EPS32 = torch.finfo(torch.float32).eps


def weight_reduce_loss(
    loss: Tensor,
    weight: Tensor | None = None,
    reduction: str = "mean",
    avg_factor: float | Tensor | None = None,
) -> Tensor:
    """mmdet `weight_reduce_loss`: loss * weight, then mean / sum / none, or sum / (avg_factor + eps)."""
    if weight is not None:
        loss = loss * weight
    if avg_factor is None:
        if reduction == "mean":
            return loss.mean()
        if reduction == "sum":
            return loss.sum()
        if reduction == "none":
            return loss
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if reduction == "mean":
        return loss.sum() / (avg_factor + _EPS32)
    if reduction == "none":
        return loss
    raise ValueError(f"avg_factor needs reduction 'mean' or 'none', got {reduction!r}")


def quality_focal_loss(
    logits: Tensor, labels: Tensor, scores: Tensor, beta: float = 2.0, class_weight: Tensor | None = None
) -> Tensor:
    """Quality Focal Loss (GFL), mmdet `quality_focal_loss`, unreduced.

    logits: (N, C) raw class logits; labels: (N,) int in [0, C], C = background; scores: (N,) IoU-quality
    target of each positive (ignored for background rows). Returns (N,): per-sample sum over classes of
      BCE(logit, 0) * sigmoid(logit)^beta                 for every entry, except
      BCE(logit, score) * |score - sigmoid(logit)|^beta   for the labelled class of a positive.
    class_weight: optional (C,) factor on each class's term before the sum (FedLoss: the 0/1 selected classes).
    No host sync (no nonzero(): the positive term is computed on every row and selected by a mask).
    Reduce with `weight_reduce_loss(loss, label_weights, avg_factor=...)`.
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1] or scores.shape != labels.shape:
        raise ValueError(
            f"quality_focal_loss needs logits (N, C), labels (N,), scores (N,); got {tuple(logits.shape)}, "
            f"{tuple(labels.shape)}, {tuple(scores.shape)}"
        )
    prob = logits.sigmoid()
    loss = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none") * prob.pow(
        beta
    )
    num_classes = logits.shape[1]
    # the positive term on every row (its label's column; background rows read column 0 and are masked out):
    # masks instead of nonzero() keep the shapes static, so no host sync
    labels = labels.long()
    is_pos = (labels >= 0) & (labels < num_classes)
    column = torch.where(is_pos, labels, 0)[:, None]  # (N, 1)
    pos_logits = logits.gather(1, column).squeeze(1)
    pos_scores = scores.to(logits.dtype)
    scale = (pos_scores - prob.gather(1, column).squeeze(1)).abs().pow(beta)
    pos_loss = F.binary_cross_entropy_with_logits(pos_logits, pos_scores, reduction="none") * scale  # (N,)
    at_label = is_pos[:, None] & (torch.arange(num_classes, device=labels.device) == column)  # (N, C)
    loss = torch.where(at_label, pos_loss[:, None], loss)
    if class_weight is not None:
        loss = loss * class_weight.to(loss.dtype)
    return loss.sum(dim=1)


def sigmoid_focal_loss(
    logits: Tensor,
    labels: Tensor,
    weight: Tensor | None = None,
    avg_factor: float | Tensor | None = None,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> Tensor:
    """Sigmoid focal loss (RetinaNet / mmdet `FocalLoss(use_sigmoid=True)`), reduced.

    logits: (N, C); labels: (N,) int in [0, C], C = background (all-zero one-hot target); weight: (N,)
    per-sample or (N, C) per-entry weight, or None. Uses torchvision.ops.sigmoid_focal_loss elementwise (the
    formula of mmdet's `py_sigmoid_focal_loss`; float rounding differs by ~1e-7 relative), then mmdet's
    reduction.
    """
    num_classes = logits.shape[1]
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels must be (N,) = {tuple(logits.shape[:1])}, got {tuple(labels.shape)}")
    target = F.one_hot(labels.long(), num_classes + 1)[:, :num_classes].to(logits.dtype)
    loss = tv_sigmoid_focal_loss(logits, target, alpha=alpha, gamma=gamma, reduction="none")
    if weight is not None and weight.dim() == 1:
        weight = weight.reshape(-1, 1)  # (N,) -> (N, 1), broadcast over classes as mmdet does
    return weight_reduce_loss(loss, weight, "mean", avg_factor)


def l1_loss(
    pred: Tensor, target: Tensor, weight: Tensor | None = None, avg_factor: float | Tensor | None = None
) -> Tensor:
    """mmdet `L1Loss`: |pred - target| * weight, summed / (avg_factor + eps). pred, target, weight: (N, 4)."""
    if target.numel() == 0:
        return pred.sum() * 0
    if pred.shape != target.shape:
        raise ValueError(f"l1_loss needs equal shapes, got {tuple(pred.shape)} and {tuple(target.shape)}")
    return weight_reduce_loss((pred - target).abs(), weight, "mean", avg_factor)


def giou_loss(
    pred: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    avg_factor: float | Tensor | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """mmdet `GIoULoss` (eps 1e-6): 1 - GIoU(pred[i], target[i]), weighted and reduced, with no host sync.

    pred, target: (N, 4) xyxy (pixels in the authors' use); weight: (N,) or (N, 4) (averaged over the last
    dim, as mmdet does). If no weight is positive the result is `(pred * weight).sum()` (a zero with a graph).
    We do not use torchvision's generalized_box_iou_loss: it adds eps=1e-7 to the union and enclosing area
    instead of clamping them at 1e-6, which differs for degenerate boxes (identical otherwise).
    """
    if weight is not None and weight.dim() > 1 and weight.shape != pred.shape:
        raise ValueError(f"giou_loss weight must be (N,) or (N, 4), got {tuple(weight.shape)}")
    loss = 1 - aligned_iou(pred, target, mode="giou", eps=eps)
    if weight is None:
        return weight_reduce_loss(loss, None, "mean", avg_factor)
    reduced = weight_reduce_loss(loss, weight.mean(-1) if weight.dim() > 1 else weight, "mean", avg_factor)
    # mmdet returns (pred * weight).sum() when no weight is positive; chosen on the device (no `if` on a tensor)
    none_pos = (pred * (weight.unsqueeze(1) if pred.dim() == weight.dim() + 1 else weight)).sum()
    return torch.where((weight > 0).any(), reduced, none_pos)
