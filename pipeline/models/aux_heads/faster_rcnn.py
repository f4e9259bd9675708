"""Faster R-CNN auxiliary head of Co-DETR: RPN + RoI head as one AuxHead (CO_DETR_SPEC.md 2.3), with the numerics
of the authors' mmdet 3.x port (`RPNHead`, `CoStandardRoIHead`, `Shared2FCBBoxHead`, `MaxIoUAssigner`,
`RandomSampler`).

This file holds the two-stage target machinery shared by both stages (MaxIoU assignment, random sampling) and the
composed head; the stages themselves live in `rpn.py` and `roi_head.py` and receive their assigner and sampler.

Loss keys (the authors' names; `k` = `loss_index`, 0 for the first RoI head, as in the authors' K order):

| key             | term (unweighted; weights: loss_weights.weigh)   | weight at lambda2 = 2 |
|-----------------|--------------------------------------------------|-----------------------|
| loss_rpn_cls{r} | BCE objectness over sampled anchors              | 12                    |
| loss_rpn_bbox{r}| L1 on encoded deltas of positive anchors         | 12                    |
| loss_cls{k}     | softmax CE over sampled RoIs                     | 12                    |
| loss_bbox{k}    | GIoU on decoded boxes, / number of sampled RoIs  | 120                   |
| acc{k}          | RoI classification accuracy in % (a metric)      | none                  |

`acc{k}` is detached and is NOT a loss: sum only the keys containing "loss" (mmdet's `parse_losses` rule).
`{r}` is empty for group 0 (the authors' `loss_rpn_cls`) and k otherwise (a second Faster R-CNN head).

Parameter names map onto the authors' checkpoint keys as
  `rpn_head.{rpn_conv,rpn_cls,rpn_reg}.*`        -> `rpn_head.{rpn_conv,rpn_cls,rpn_reg}.*` (same)
  `roi_head.0.bbox_head.{shared_fcs.0,shared_fcs.1,fc_cls,fc_reg}.*` -> `roi_head.bbox_head.*`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from pipeline.models.aux_heads.base import AuxHead, AuxPositives
from pipeline.models.aux_heads.roi_head import RoIHead
from pipeline.models.aux_heads.rpn import RPNHead
from pipeline.models.aux_heads.table import AuxBuildContext, FasterRCNNConfig
from pipeline.models.box_ops import box_cxcywh_to_xyxy
from pipeline.models.task_modules.max_iou_assigner import MaxIoUAssigner
from pipeline.models.task_modules.random_sampler import RandomSampler


class FasterRCNNHead(AuxHead):
    """RPN + RoI head on the adapter maps; forward_train(feats, targets, img_sizes) -> (losses, AuxPositives).

    feats: the 6 adapter maps (B, C, h_l, w_l), strides cfg.strides; the RPN uses all of them, the RoI head the
    first len(cfg.strides) - 1 (strides 4..64, as the authors' `featmap_strides`).
    targets: B dicts with `boxes (N, 4)` cxcywh normalised by the unpadded size and `labels (N,)`.
    img_sizes: (B, 2) (h, w) of the unpadded network input: GT boxes are scaled by it, proposals are clipped to it,
    and RPN anchors beyond ceil(size / pad_size_divisor) * pad_size_divisor are ignored (mmdet `valid_flags` on the
    per-image `pad_shape`; the authors' Co-DINO configs pad with size_divisor 1, hence the default 1).
    Positives: head "faster_rcnn"; the sampled RoIs (positives first), see `RoIHead.forward_train`.
    Losses are unweighted; the `*_weight` fields of FasterRCNNConfig are the table's base weights.
    """

    name = "faster_rcnn"

    def __init__(
        self,
        num_classes: int = 80,
        cfg: FasterRCNNConfig | None = None,
        in_channels: int = 256,
        loss_index: int = 0,
        pad_size_divisor: int = 1,
    ) -> None:
        super().__init__()
        cfg = cfg if cfg is not None else FasterRCNNConfig()
        rpn_assigner = MaxIoUAssigner(cfg.rpn_pos_iou, cfg.rpn_neg_iou, cfg.rpn_min_pos_iou, match_low_quality=True)
        roi_assigner = MaxIoUAssigner(cfg.roi_pos_iou, cfg.roi_pos_iou, cfg.roi_pos_iou, match_low_quality=False)
        self.rpn_head = RPNHead(
            assigner=rpn_assigner,
            sampler=RandomSampler(cfg.rpn_num_samples, cfg.rpn_pos_fraction, add_gt_as_proposals=False),
            loss_suffix="" if loss_index == 0 else str(loss_index),
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


def build(cfg: FasterRCNNConfig, ctx: AuxBuildContext) -> FasterRCNNHead:
    """The table's builder (pipeline/models/aux_heads/table.py)."""
    strides = ctx.strides_of(cfg.strides)
    if strides != cfg.strides:
        import dataclasses

        cfg = dataclasses.replace(cfg, strides=strides)
    return FasterRCNNHead(ctx.num_classes, cfg, ctx.embed_dims, loss_index=ctx.loss_index)


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
