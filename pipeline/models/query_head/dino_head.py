"""Co-DINO query head: prediction branches and the one-to-one / denoising / aux-query losses.

Branches (CO_DETR_SPEC.md 1.1 "Prediction branches and init"): L + 1 separate `cls_branches` Linear(C, nc) and
`reg_branches` MLP (Linear C->C, ReLU) x num_reg_fcs + Linear C->4; index L (the last) scores the encoder
proposals. Init: class bias -log((1-p)/p) with p = 0.01, last reg Linear weight and bias 0.

Losses (spec 4.1, 3.4), all on per-query targets, with no host sync (normalisers stay tensors, positives are
selected by masks, not by data-dependent indexing; the Hungarian matching of all decoder layers and the encoder
proposals is one `HungarianMatcher.match_many` call, the step's one device->host copy):
- classification: QualityFocalLoss(beta 2) with the IoU of the detached prediction with its target as the
  soft label, summed over classes, divided by max(#positives (all-reduced mean), 1);
- L1 on normalised cxcywh and GIoU on pixel xyxy, both divided by max(#positives (all-reduced), 1).
Matching queries / encoder proposals get targets from the Hungarian matcher; DN slots arrive with their
targets. (The aux-query losses, same formulas without matching, are `aux_queries.aux_decoder_losses`.)

Co-Deformable-DETR (spec 4.2): `cls_loss="focal"` replaces QFL by the sigmoid focal loss (alpha 0.25, gamma 2,
weight 2.0, label weights, same avg factor), and `binary_enc_labels=True` matches the encoder proposals (then all
tokens) against every GT labelled as class 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pipeline.models.box_ops import aligned_iou, box_cxcywh_to_xyxy, inverse_sigmoid
from pipeline.models.fed_loss import fed_class_mask
from pipeline.models.losses import (
    giou_loss,
    l1_loss,
    quality_focal_loss,
    reduce_mean,
    sigmoid_focal_loss,
    weight_reduce_loss,
)
from pipeline.models.query_head.matcher import HungarianMatcher, Matches, MatchProblem

LossTriple = tuple[Tensor, Tensor, Tensor]


def _reg_branch(embed_dims: int, num_reg_fcs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_reg_fcs):
        layers += [nn.Linear(embed_dims, embed_dims), nn.ReLU()]
    layers.append(nn.Linear(embed_dims, 4))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """cls_branches / reg_branches (num_pred = num_decoder_layers + 1 each) and the loss computations."""

    def __init__(
        self,
        num_classes: int,
        embed_dims: int = 256,
        num_decoder_layers: int = 6,
        num_reg_fcs: int = 2,
        cls_prior_prob: float = 0.01,
        matcher: HungarianMatcher | None = None,
        cls_weight: float = 1.0,
        bbox_weight: float = 5.0,
        iou_weight: float = 2.0,
        qfl_beta: float = 2.0,
        ref_eps: float = 1e-3,
        cls_loss: str = "qfl",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        binary_enc_labels: bool = False,
    ) -> None:
        super().__init__()
        if cls_loss not in ("qfl", "focal"):
            raise ValueError(f"cls_loss must be 'qfl' or 'focal', got {cls_loss!r}")
        self.num_classes = num_classes
        self.cls_loss = cls_loss
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.binary_enc_labels = binary_enc_labels
        self.num_decoder_layers = num_decoder_layers
        self.matcher = matcher or HungarianMatcher()
        self.cls_weight, self.bbox_weight, self.iou_weight = cls_weight, bbox_weight, iou_weight
        self.qfl_beta = qfl_beta
        self.ref_eps = ref_eps
        num_pred = num_decoder_layers + 1
        self.cls_branches = nn.ModuleList(nn.Linear(embed_dims, num_classes) for _ in range(num_pred))
        self.reg_branches = nn.ModuleList(_reg_branch(embed_dims, num_reg_fcs) for _ in range(num_pred))
        self.init_weights(cls_prior_prob)

    def init_weights(self, cls_prior_prob: float = 0.01) -> None:
        bias = -math.log((1 - cls_prior_prob) / cls_prior_prob)
        for cls in self.cls_branches:
            nn.init.constant_(cls.bias, bias)
        for reg in self.reg_branches:
            nn.init.zeros_(reg[-1].weight)
            nn.init.zeros_(reg[-1].bias)

    def predict(self, hidden: Tensor, references: Tensor) -> tuple[Tensor, Tensor]:
        """hidden: (L, B, Q, C) normed decoder states; references: (L + 1, B, Q, 4) (only the first L are used:
        layer l refines references[l], look-forward-twice). Returns logits (L, B, Q, nc), boxes (L, B, Q, 4)
        sigmoid cxcywh normalised by the unpadded image size."""
        logits, boxes = [], []
        for lvl in range(hidden.shape[0]):
            logits.append(self.cls_branches[lvl](hidden[lvl]))
            delta = self.reg_branches[lvl](hidden[lvl])
            boxes.append((delta + inverse_sigmoid(references[lvl], eps=self.ref_eps)).sigmoid())
        return torch.stack(logits), torch.stack(boxes)

    # ------------------------------------------------------------------------------------------------------
    # targets
    @torch.no_grad()
    def matched_targets(
        self, logits: Tensor, boxes: Tensor, targets: Sequence[dict[str, Tensor]], img_sizes: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Hungarian one-to-one targets. logits (B, Q, nc), boxes (B, Q, 4) -> labels (B, Q) (bg = nc),
        label_weights (B, Q), box_targets (B, Q, 4) cxcywh normalised, box_weights (B, Q, 4)."""
        gt_labels = [t["labels"].to(logits.device) for t in targets]
        gt_boxes = [t["boxes"].to(device=logits.device, dtype=boxes.dtype) for t in targets]
        (m,) = self.matcher.match_many([MatchProblem(logits[None], boxes[None], gt_labels)], gt_boxes, img_sizes)
        out = self.targets_from_matches(m, logits.shape[:2], 1, gt_labels, gt_boxes, boxes.dtype)
        return out[0][0], out[1][0], out[2][0], out[3][0]

    def targets_from_matches(
        self,
        m: Matches,
        batch_queries: Sequence[int],
        num_layers: int,
        gt_labels: Sequence[Tensor],
        gt_boxes: Sequence[Tensor],
        dtype: torch.dtype = torch.float32,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-query targets of `num_layers` prediction sets of (B, Q) = batch_queries from their matches (one
        scatter each, no loop): labels (L, B, Q) long (bg = nc), label_weights (L, B, Q), box_targets (L, B, Q, 4)
        cxcywh normalised, box_weights (L, B, Q, 4)."""
        b, q = batch_queries
        device = m.query.device
        shape = (num_layers, b, q)
        labels = torch.full(shape, self.num_classes, dtype=torch.long, device=device)
        box_targets = torch.zeros(*shape, 4, device=device, dtype=dtype)
        box_weights = torch.zeros_like(box_targets)
        if len(gt_labels):
            all_labels = torch.cat([g.to(device).long().reshape(-1) for g in gt_labels])
            all_boxes = torch.cat([g.to(device=device, dtype=dtype).reshape(-1, 4) for g in gt_boxes])
            where = (m.layer, m.image, m.query)
            labels[where] = all_labels[m.gt]
            box_targets[where] = all_boxes[m.gt]
            box_weights[where] = 1.0
        return labels, torch.ones(shape, device=device), box_targets, box_weights

    # ------------------------------------------------------------------------------------------------------
    # losses
    def assigned_loss(
        self,
        logits: Tensor,
        boxes: Tensor,
        labels: Tensor,
        label_weights: Tensor,
        box_targets: Tensor,
        box_weights: Tensor,
        img_sizes: Tensor,
        class_mask: Tensor | None = None,
    ) -> LossTriple:
        """QFL (or focal) / L1 / GIoU of queries with given targets (mmdet `loss_single` after `get_targets`).

        logits: (B, Q, nc); boxes: (B, Q, 4) sigmoid cxcywh; labels: (B, Q) long, bg = nc; label_weights (B, Q);
        box_targets: (B, Q, 4) cxcywh normalised; box_weights: (B, Q, 4); img_sizes: (B, 2) (h, w).
        class_mask: (nc,) FedLoss selection (pipeline/models/fed_loss.py): the class loss sums over those only.
        Returns (loss_cls, loss_bbox, loss_iou), already weighted.
        """
        logits, boxes = logits.float(), boxes.float()  # losses in fp32 under autocast
        b, q, nc = logits.shape
        logits_f = logits.reshape(-1, nc)
        boxes_f = boxes.reshape(-1, 4)
        labels_f = labels.reshape(-1)
        targets_f = box_targets.reshape(-1, 4).to(boxes.dtype)
        pos = (labels_f >= 0) & (labels_f < self.num_classes)
        num_pos = pos.sum().to(logits.dtype)  # a tensor: no host sync
        avg = reduce_mean(num_pos).clamp(min=1)  # one all-reduce serves the class and the box normalisers

        if self.cls_loss == "focal":
            lw = label_weights.reshape(-1) if class_mask is None else label_weights.reshape(-1, 1) * class_mask
            loss_cls = self.cls_weight * sigmoid_focal_loss(
                logits_f, labels_f, lw, avg, self.focal_alpha, self.focal_gamma
            )
        else:
            # IoU on every row, kept on the positives (a mask, not x[pos]: no data-dependent shape)
            ious = aligned_iou(box_cxcywh_to_xyxy(boxes_f).detach(), box_cxcywh_to_xyxy(targets_f))
            scores = torch.where(pos, ious, ious.new_zeros(()))
            qfl = quality_focal_loss(logits_f, labels_f, scores, beta=self.qfl_beta, class_weight=class_mask)
            loss_cls = self.cls_weight * weight_reduce_loss(qfl, label_weights.reshape(-1), "mean", avg)

        box_avg = avg  # the same tensor normaliser (mmdet reads it with .item(): a host sync per call)
        w = box_weights.reshape(-1, 4).to(boxes.dtype)
        factors = img_sizes.flip(-1).repeat(1, 2).to(boxes.dtype)[:, None].expand(b, q, 4).reshape(-1, 4)
        pred_px = box_cxcywh_to_xyxy(boxes_f) * factors
        target_px = box_cxcywh_to_xyxy(targets_f) * factors
        loss_iou = self.iou_weight * giou_loss(pred_px, target_px, weight=w, avg_factor=box_avg)
        loss_bbox = self.bbox_weight * l1_loss(boxes_f, targets_f, weight=w, avg_factor=box_avg)
        return loss_cls, loss_bbox, loss_iou

    def one_to_one_loss(
        self, logits: Tensor, boxes: Tensor, targets: Sequence[dict[str, Tensor]], img_sizes: Tensor,
        class_mask: Tensor | None = None,
    ) -> LossTriple:  # fmt: skip
        """Hungarian-matched loss of one set of predictions: logits (B, Q, nc), boxes (B, Q, 4)."""
        assigned = self.matched_targets(logits.detach(), boxes.detach(), targets, img_sizes)
        return self.assigned_loss(logits, boxes, *assigned, img_sizes, class_mask=class_mask)

    def loss(
        self,
        all_logits: Tensor,
        all_boxes: Tensor,
        enc_logits: Tensor,
        enc_boxes: Tensor,
        targets: Sequence[dict[str, Tensor]],
        img_sizes: Tensor,
    ) -> dict[str, Tensor]:
        """Matching-part losses of every decoder layer (`d{l}.loss_*`, last layer `loss_*`) and of the encoder
        proposals (`enc_loss_*`). all_logits: (L, B, Q, nc); all_boxes: (L, B, Q, 4); enc_*: (B, K, ...) (Co-DINO:
        the top-k proposals; Co-DeformDETR: all K = S encoder tokens, with binary_enc_labels)."""
        gt_labels = [t["labels"] for t in targets]
        cm = fed_class_mask(self, gt_labels)  # FedLoss (LVIS): one selection per call
        gt_boxes = [t["boxes"] for t in targets]
        enc_labels = gt_labels
        if self.binary_enc_labels:  # Co-Deformable: class-agnostic proposals, every GT is class 0
            enc_labels = [torch.zeros_like(g) for g in gt_labels]
        dec = MatchProblem(all_logits.detach(), all_boxes.detach(), gt_labels)
        enc = MatchProblem(enc_logits.detach()[None], enc_boxes.detach()[None], enc_labels)
        dec_m, enc_m = self.matcher.match_many([dec, enc], gt_boxes, img_sizes)  # one host round trip for all
        n_layers, b, q = all_logits.shape[:3]
        dec_t = self.targets_from_matches(dec_m, (b, q), n_layers, gt_labels, gt_boxes)
        enc_t = self.targets_from_matches(enc_m, enc_logits.shape[:2], 1, enc_labels, gt_boxes)
        labels, label_w, box_t, box_w = dec_t  # (L, B, Q, ...)
        losses = self._per_layer(
            [self.assigned_loss(all_logits[i], all_boxes[i], labels[i], label_w[i], box_t[i], box_w[i], img_sizes,
                                class_mask=cm) for i in range(n_layers)],
            "loss",
        )  # fmt: skip
        labels, label_w, box_t, box_w = enc_t  # (1, B, K, ...)
        enc_losses = self.assigned_loss(enc_logits, enc_boxes, labels[0], label_w[0], box_t[0], box_w[0], img_sizes,
                                        class_mask=None if self.binary_enc_labels else cm)  # fmt: skip
        for name, value in zip(("cls", "bbox", "iou"), enc_losses):
            losses[f"enc_loss_{name}"] = value
        return losses

    def dn_loss(
        self, dn_logits: Tensor, dn_boxes: Tensor, dn_targets: tuple[Tensor, Tensor, Tensor, Tensor], img_sizes: Tensor
    ) -> dict[str, Tensor]:
        """Denoising losses of every layer: dn_logits (L, B, P, nc), dn_boxes (L, B, P, 4); dn_targets from
        `DenoisingQueries.targets`. Names `dn_loss_*` (last layer) and `d{l}.dn_loss_*`."""
        cm = fed_class_mask(self, dn_targets[0])  # FedLoss: the DN labels hold every GT class
        per_layer = [
            self.assigned_loss(dn_logits[i], dn_boxes[i], *dn_targets, img_sizes, class_mask=cm)
            for i in range(len(dn_logits))
        ]
        return self._per_layer(per_layer, "dn_loss")

    @staticmethod
    def _per_layer(per_layer: Sequence[Sequence[Tensor]], prefix: str) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        last = len(per_layer) - 1
        for i, triple in enumerate(per_layer):
            for name, value in zip(("cls", "bbox", "iou"), triple):
                out[f"{prefix}_{name}" if i == last else f"d{i}.{prefix}_{name}"] = value
        return out
