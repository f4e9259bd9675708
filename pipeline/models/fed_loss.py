"""Federated loss for LVIS (Zhou et al., "Probabilistic two-stage detection"; detectron2's `get_fed_loss_classes`
and Detic's `get_fed_loss_inds`), for the query head, the ATSS head and the RoI head (`model.loss.fed_loss`).

Per category c: weight w_c = image_count_c ** 0.5 (images of the training split containing c; the shards'
manifest, filled into `model.loss.fed_loss_image_counts` by the stage driver). Per loss computation:

    selected = GT classes of the batch  U  classes sampled without replacement with probability ~ w among the
               other classes, up to `num_classes` (50) in total (no sampling when the GT classes are >= 50)

and the classification loss only sums over the selected classes (the other classes get neither a positive nor a
negative gradient). Sampling is the exponential race (Efraimidis-Spirakis: key_c = Exp(1) / w_c, the smallest
keys win), the same distribution as `torch.multinomial(w, k, replacement=False)` of detectron2 / Detic, computed
on the device without a host sync (the class count k - #GT stays a tensor). Classes of weight 0 are never sampled.

Where the loss is restricted (our formulation where the authors released none: the public Co-DETR code has no
FedLoss, only the `fed_loss_weight` buffers of the LVIS checkpoints, CO_DETR_SPEC.md 6):
- one-to-one query head, QFL (`DINOHead.assigned_loss`): the per-class QFL terms of the non-selected classes
  are dropped before the sum over classes; the normaliser (number of positives) is unchanged -- Detic's
  formulation for its (Deformable-)DETR focal loss, with QFL in place of focal. One selection per call of
  `DINOHead.loss` (every decoder layer and the encoder proposals share it) and one per `dn_loss`;
- ATSS head, sigmoid focal: weight (N, C) = label weight x class mask, normaliser unchanged (Detic / detectron2);
- RoI head, softmax CE over nc + 1 (the authors' Faster R-CNN aux head): the logits of the non-selected classes
  are removed from the softmax (-inf), background always kept -- a choice: detectron2's FedLoss uses sigmoid CE,
  which the authors' RoI head (fc_cls nc + 1, softmax) does not; this keeps their head and its weights.
Not restricted: the aux-query decoder losses (`aux_queries.groups`) and the RetinaNet / FCOS / GFL aux heads.

Module placement: one `FedLoss` per head, attached by `co_detr.attach_fed_loss` (the assembly, which knows every
head) as `head.fed_loss`,
`aux_heads.{k}.fed_loss` (ATSS) and `aux_heads.{k}.roi_head.bbox_head.fed_loss` (RoI); its buffer
`fed_loss_weight` is saved with the checkpoints (the authors' `*.loss_cls.fed_loss_weight`, mapped by
pipeline/checkpoints/convert.py). Heads read it with `fed_class_mask(head, labels)` (None when absent).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FedLoss", "fed_class_mask", "fed_softmax_cross_entropy", "fed_weights"]


def fed_weights(image_counts: Sequence[int], num_classes: int, power: float = 0.5) -> Tensor:
    """(num_classes,) float32 weights image_count ** power; ones when no counts are given."""
    if not image_counts:
        return torch.ones(num_classes)
    if len(image_counts) != num_classes:
        raise ValueError(f"FedLoss needs {num_classes} image counts (one per class), got {len(image_counts)}")
    counts = torch.tensor([float(c) for c in image_counts])
    if (counts < 0).any():
        raise ValueError("FedLoss image counts must be >= 0")
    return counts.pow(power)


class FedLoss(nn.Module):
    """Class selection of the federated loss. Buffer `fed_loss_weight` (nc,): the sampling weights.

    class_mask(gt_labels) -> (nc,) float 0/1 mask of the selected classes (see the module docstring).
    """

    def __init__(self, num_classes: int, num_sample: int = 50, weight: Tensor | None = None) -> None:
        super().__init__()
        if num_sample < 1:
            raise ValueError(f"FedLoss num_sample must be >= 1, got {num_sample}")
        self.num_classes = num_classes
        self.num_sample = num_sample
        w = torch.ones(num_classes) if weight is None else weight.detach().float().clone()
        if w.shape != (num_classes,):
            raise ValueError(f"FedLoss weight must be ({num_classes},), got {tuple(w.shape)}")
        self.register_buffer("fed_loss_weight", w)

    @torch.no_grad()
    def class_mask(self, gt_labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """gt_labels: any-shape long tensor of labels (values == nc, the background, are ignored) -> (nc,) mask:
        1 for every GT class and for the classes sampled by weight up to num_sample in total."""
        nc = self.num_classes
        w = self.fed_loss_weight.float()
        device = w.device
        present = torch.zeros(nc + 1, dtype=torch.bool, device=device)
        present[gt_labels.reshape(-1).to(device=device, dtype=torch.long).clamp(0, nc)] = True
        present = present[:nc]
        u = 1.0 - torch.rand(nc, device=device, generator=generator)  # (0, 1]
        keys = torch.where(w > 0, -torch.log(u) / w.clamp_min(1e-30), torch.full_like(w, float("inf")))
        keys = keys.masked_fill(present, -1.0)  # GT classes first in the race
        rank = torch.empty(nc, dtype=torch.long, device=device)
        rank[keys.argsort()] = torch.arange(nc, device=device)
        sampled = (rank < self.num_sample) & torch.isfinite(keys)
        return (present | sampled).float()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, num_sample={self.num_sample}"


def fed_class_mask(module: nn.Module, labels: Tensor | Sequence[Tensor]) -> Tensor | None:
    """The selected-class mask (nc,) of `module.fed_loss` for these GT labels, or None without FedLoss."""
    fed = getattr(module, "fed_loss", None)
    if fed is None:
        return None
    if not isinstance(labels, Tensor):
        labels = torch.cat([lab.reshape(-1) for lab in labels]) if len(labels) else torch.zeros(0, dtype=torch.long)
    return fed.class_mask(labels)


def fed_softmax_cross_entropy(cls_score: Tensor, labels: Tensor, class_mask: Tensor) -> Tensor:
    """Softmax CE over the selected classes + background only, unreduced.

    cls_score: (R, nc + 1) logits (bg last); labels: (R,) in [0, nc], every label selected or background;
    class_mask: (nc,) 0/1. Returns (R,) = -log softmax_{selected + bg}(cls_score)[label].
    """
    keep = torch.cat([class_mask.bool(), class_mask.new_ones(1, dtype=torch.bool)])
    return F.cross_entropy(cls_score.masked_fill(~keep, float("-inf")), labels, reduction="none")
