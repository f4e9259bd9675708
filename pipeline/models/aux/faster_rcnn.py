"""Faster R-CNN auxiliary head of Co-DETR: RPN + RoI head as one AuxHead (CO_DETR_SPEC.md 2.3), with the numerics
of the authors' mmdet 3.x port (`RPNHead`, `CoStandardRoIHead`, `Shared2FCBBoxHead`, `MaxIoUAssigner`,
`RandomSampler`).

This file holds the two-stage target machinery shared by both stages (MaxIoU assignment, random sampling) and the
composed head; the stages themselves live in `rpn.py` and `roi_head.py` and receive their assigner and sampler.

Loss keys (the authors' names; `k` = `loss_index`, 0 for the first RoI head, as in the authors' K order):

| key             | term                                             | weight at lambda2 = 2 |
|-----------------|--------------------------------------------------|-----------------------|
| loss_rpn_cls    | BCE objectness over sampled anchors              | 12                    |
| loss_rpn_bbox   | L1 on encoded deltas of positive anchors         | 12                    |
| loss_cls{k}     | softmax CE over sampled RoIs                     | 12                    |
| loss_bbox{k}    | GIoU on decoded boxes, / number of sampled RoIs  | 120                   |
| acc{k}          | RoI classification accuracy in % (a metric)      | none                  |

`acc{k}` is detached and is NOT a loss: sum only the keys containing "loss" (mmdet's `parse_losses` rule).

Parameter names map onto the authors' checkpoint keys as
  `rpn_head.{rpn_conv,rpn_cls,rpn_reg}.*`        -> `rpn_head.{rpn_conv,rpn_cls,rpn_reg}.*` (same)
  `roi_head.0.bbox_head.{shared_fcs.0,shared_fcs.1,fc_cls,fc_reg}.*` -> `roi_head.bbox_head.*`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.models.assigners import AssignResult
from pipeline.models.aux.base import AuxHead, AuxPositives
from pipeline.models.aux.roi_head import RoIHead
from pipeline.models.aux.rpn import RPNHead
from pipeline.models.box_ops import box_cxcywh_to_xyxy, box_iou
from pipeline.models.config import FasterRCNNConfig
from pipeline.models.loss_weights import RoiWeights, RpnWeights, co_loss_weights


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


class FasterRCNNHead(AuxHead):
    """RPN + RoI head on the adapter maps; forward_train(feats, targets, img_sizes) -> (losses, AuxPositives).

    feats: the 6 adapter maps (B, C, h_l, w_l), strides cfg.strides; the RPN uses all of them, the RoI head the
    first len(cfg.strides) - 1 (strides 4..64, as the authors' `featmap_strides`).
    targets: B dicts with `boxes (N, 4)` cxcywh normalised by the unpadded size and `labels (N,)`.
    img_sizes: (B, 2) (h, w) of the unpadded network input: GT boxes are scaled by it, proposals are clipped to it,
    and RPN anchors beyond ceil(size / pad_size_divisor) * pad_size_divisor are ignored (mmdet `valid_flags` on the
    per-image `pad_shape`; the authors' Co-DINO configs pad with size_divisor 1, hence the default 1).
    Positives: head "faster_rcnn"; the sampled RoIs (positives first), see `RoIHead.forward_train`.
    Loss weights are the effective ones (default: `co_loss_weights()`, i.e. lambda2 = 2, 6 layers); the base
    `*_weight` fields of FasterRCNNConfig are not read here (the builder turns them into RpnWeights / RoiWeights).
    """

    name = "faster_rcnn"

    def __init__(
        self,
        num_classes: int = 80,
        cfg: FasterRCNNConfig | None = None,
        rpn_weights: RpnWeights | None = None,
        roi_weights: RoiWeights | None = None,
        in_channels: int = 256,
        loss_index: int = 0,
        pad_size_divisor: int = 1,
    ) -> None:
        super().__init__()
        cfg = cfg if cfg is not None else FasterRCNNConfig()
        weights = co_loss_weights()
        rpn_assigner = MaxIoUAssigner(cfg.rpn_pos_iou, cfg.rpn_neg_iou, cfg.rpn_min_pos_iou, match_low_quality=True)
        roi_assigner = MaxIoUAssigner(cfg.roi_pos_iou, cfg.roi_pos_iou, cfg.roi_pos_iou, match_low_quality=False)
        self.rpn_head = RPNHead(
            assigner=rpn_assigner,
            sampler=RandomSampler(cfg.rpn_num_samples, cfg.rpn_pos_fraction, add_gt_as_proposals=False),
            weights=rpn_weights if rpn_weights is not None else weights.rpn,
            in_channels=in_channels,
            feat_channels=in_channels,
            strides=cfg.strides,
            octave_base_scale=cfg.anchor_octave_base_scale,
            scales_per_octave=cfg.anchor_scales_per_octave,
            ratios=cfg.anchor_ratios,
            nms_pre=cfg.rpn_nms_pre,
            nms_iou=cfg.rpn_nms_iou,
            max_per_img=cfg.rpn_max_per_img,
            pad_size_divisor=pad_size_divisor,
        )
        self.roi_head = RoIHead(
            num_classes=num_classes,
            assigner=roi_assigner,
            sampler=RandomSampler(cfg.roi_num_samples, cfg.roi_pos_fraction, cfg.roi_add_gt_as_proposals),
            weights=roi_weights if roi_weights is not None else weights.roi,
            in_channels=in_channels,
            strides=cfg.strides[:-1],
            output_size=cfg.roi_output_size,
            finest_scale=cfg.roi_finest_scale,
            fc_dim=cfg.roi_fc_dim,
            coder_stds=cfg.roi_coder_stds,
            loss_index=loss_index,
        )

    def forward_train(
        self, feats: list[Tensor], targets: list[dict[str, Tensor]], img_sizes: Tensor
    ) -> tuple[dict[str, Tensor], AuxPositives]:
        gt_boxes, gt_labels = gt_to_pixels(targets, img_sizes, feats[0].device)
        rpn_losses, proposals = self.rpn_head.forward_train(feats, gt_boxes, img_sizes)
        roi_losses, (coords, labels, boxes, pooled) = self.roi_head.forward_train(
            feats[: len(self.roi_head.strides)], proposals, gt_boxes, gt_labels
        )
        positives = AuxPositives(head=self.name, coords=coords, labels=labels, targets=boxes, feats=pooled)
        return {**rpn_losses, **roi_losses}, positives


def gt_to_pixels(
    targets: Sequence[dict[str, Tensor]], img_sizes: Tensor, device: torch.device
) -> tuple[list[Tensor], list[Tensor]]:
    """targets' `boxes (N, 4)` cxcywh normalised by img_sizes[i] (h, w) -> per image (N, 4) xyxy pixels (float32)
    and `labels (N,)` long, on `device`."""
    if len(targets) != img_sizes.shape[0]:
        raise ValueError(f"got {len(targets)} targets for {img_sizes.shape[0]} images")
    boxes, labels = [], []
    for t, (h, w) in zip(targets, img_sizes.tolist()):
        b = t["boxes"].to(device=device, dtype=torch.float32).reshape(-1, 4)
        boxes.append(box_cxcywh_to_xyxy(b) * b.new_tensor([w, h, w, h]))
        labels.append(t["labels"].to(device=device, dtype=torch.long).reshape(-1))
    return boxes, labels
