"""RetinaNet auxiliary head (paper Table 1 / Table 8; Lin et al. 2017 with mmdet's `RetinaHead` defaults).

Architecture (mmdet key names): `stacked_convs` (1, as the authors' aux ATSS) 3x3 conv + ReLU per tower
(`cls_convs.i.conv`, `reg_convs.i.conv`, with bias, no norm, as the original), then 3x3 `retina_cls` (A * nc,
sigmoid, bias prior 0.01) and `retina_reg` (4 A deltas). Init N(0, 0.01), bias 0. A = 9 anchors per location:
mmdet anchors (centre offset 0), octave_base_scale 4, 3 scales per octave, ratios (0.5, 1, 2), base = stride.

Training (per image; every anchor of the batch maps counts as valid, as the aux ATSS):
  MaxIoUAssigner(pos >= 0.5, neg < 0.4, min_pos_iou 0, low-quality matches): IoU in [0.4, 0.5) is ignored.
  loss_cls{k}  = sum focal(cls, onehot) over pos + neg anchors / N,  N = reduce_mean(sum_b max(#pos_b, 1))
  loss_bbox{k} = sum_pos (1 - GIoU(decode(anchor, delta), gt)) / N                 (decoded boxes, paper Table 1)
Both unweighted; the table's base weights (cls_weight 1, bbox_weight 2) x lambda2 x 6 are applied by the model.

Export: AuxPositives(head="retinanet", coords = all anchors (N, 4) xyxy, labels (N,) bg = nc (negatives and ignored
anchors), targets = assigned GT xyxy (zeros elsewhere), feats = with_coord_feat: the adapter feature of each
anchor's location (N, C), repeated over its A anchors).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pipeline.models.aux_heads.base import AuxHead, AuxPositives
from pipeline.models.aux_heads.dense import ConvReLU, check_levels, conv_tower, flatten_levels, init_dense_head
from pipeline.models.aux_heads.faster_rcnn import gt_to_pixels
from pipeline.models.aux_heads.table import AuxBuildContext, RetinaNetConfig
from pipeline.models.box_ops import DeltaXYWHCoder
from pipeline.models.losses import giou_loss, reduce_mean, sigmoid_focal_loss
from pipeline.models.task_modules.anchors import anchor_scales, cached_grid_anchors
from pipeline.models.task_modules.batching import pad_gts
from pipeline.models.task_modules.max_iou_assigner import MaxIoUAssigner


class RetinaNetHead(AuxHead):
    """forward(feats) -> (cls per level (B, A nc, h, w), deltas (B, 4 A, h, w));
    forward_train(feats, targets, img_sizes) -> (unweighted losses, AuxPositives)."""

    name = "retinanet"

    def __init__(
        self,
        num_classes: int = 80,
        in_channels: int = 256,
        feat_channels: int = 256,
        cfg: RetinaNetConfig | None = None,
        strides: Sequence[int] = (4, 8, 16, 32, 64, 128),
        loss_index: int = 0,
        with_coord_feat: bool = False,
    ) -> None:
        super().__init__()
        cfg = cfg if cfg is not None else RetinaNetConfig()
        self.num_classes = num_classes
        self.strides = tuple(int(s) for s in strides)
        self.scales = anchor_scales(None, cfg.octave_base_scale, cfg.scales_per_octave)
        self.ratios = tuple(float(r) for r in cfg.ratios)
        self.num_anchors = len(self.scales) * len(self.ratios)  # A
        self.loss_index = loss_index
        self.with_coord_feat = with_coord_feat
        self.focal_alpha, self.focal_gamma = cfg.focal_alpha, cfg.focal_gamma
        self.assigner = MaxIoUAssigner(cfg.pos_iou, cfg.neg_iou, cfg.min_pos_iou, match_low_quality=True)
        self.coder = DeltaXYWHCoder(stds=cfg.coder_stds)
        chans = [in_channels] + [feat_channels] * cfg.stacked_convs
        self.cls_convs = conv_tower(ConvReLU, in_channels, feat_channels, cfg.stacked_convs)
        self.reg_convs = conv_tower(ConvReLU, in_channels, feat_channels, cfg.stacked_convs)
        self.retina_cls = nn.Conv2d(chans[-1], self.num_anchors * num_classes, 3, padding=1)
        self.retina_reg = nn.Conv2d(chans[-1], self.num_anchors * 4, 3, padding=1)
        init_dense_head(self, self.retina_cls, cfg.prior_prob)

    def forward(self, feats: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        check_levels(self, feats, self.strides)
        cls_scores, deltas = [], []
        for x in feats:
            c, r = self.cls_convs(x), self.reg_convs(x)
            cls_scores.append(self.retina_cls(c))
            deltas.append(self.retina_reg(r))
        return cls_scores, deltas

    @torch.no_grad()
    def targets(self, anchors: Tensor, gt_boxes: Tensor, gt_labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One image: anchors (N, 4), GT (G, 4) xyxy, (G,) -> labels (N,) bg = nc, label weights (N,) (0 on
        ignored anchors), assigned GT (N, 4) (zeros off the positives)."""
        res = self.assigner.assign(anchors, gt_boxes, gt_labels)
        labels = torch.full_like(res.gt_inds, self.num_classes)
        pos = res.gt_inds > 0
        labels[pos] = res.labels[pos]
        assigned = anchors.new_zeros(anchors.shape)
        assigned[pos] = gt_boxes[res.gt_inds[pos] - 1]
        return labels, (res.gt_inds >= 0).to(anchors.dtype), assigned

    @torch.no_grad()
    def targets_batch(
        self, anchors: Tensor, gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """`targets` for every image at once: GT padded (B, G, 4), (B, G), valid (B, G) -> labels (B, N),
        label weights (B, N), assigned GT (B, N, 4); equal to `targets` per image."""
        res = self.assigner.assign_batch(anchors, gt_boxes, gt_labels, gt_valid)
        pos = res.gt_inds > 0
        labels = torch.where(pos, res.labels, self.num_classes)
        assigned = gt_boxes.gather(1, (res.gt_inds - 1).clamp(min=0)[..., None].expand(-1, -1, 4))
        assigned = torch.where(pos[..., None], assigned, assigned.new_zeros(()))
        return labels, (res.gt_inds >= 0).to(anchors.dtype), assigned

    def forward_train(
        self, feats: list[Tensor], targets: list[dict[str, Tensor]], img_sizes: Tensor
    ) -> tuple[dict[str, Tensor], AuxPositives]:
        cls_scores, deltas = self(feats)
        b, nc, device = cls_scores[0].shape[0], self.num_classes, cls_scores[0].device
        sizes = [(int(m.shape[-2]), int(m.shape[-1])) for m in cls_scores]
        anchors = torch.cat(cached_grid_anchors(sizes, self.strides, self.scales, self.ratios, device))  # (N, 4)
        gt_boxes, gt_labels = gt_to_pixels(targets, img_sizes, device)
        # (B, N), (B, N), (B, N, 4): one batched assignment
        labels, label_w, assigned = self.targets_batch(anchors, *pad_gts(gt_boxes, gt_labels))
        pos = labels < nc
        num_pos = pos.sum(1).clamp(min=1).sum()  # mmdet SamplingResult.num_pos = max(#pos, 1), summed
        avg = reduce_mean(num_pos.to(torch.float32))  # a device tensor: no host sync

        cls = flatten_levels(cls_scores, nc).float()  # (B, N, nc)
        reg = flatten_levels(deltas, 4).float()  # (B, N, 4)
        loss_cls = sigmoid_focal_loss(cls.reshape(-1, nc), labels.reshape(-1), label_w.reshape(-1), avg,
                                      self.focal_alpha, self.focal_gamma)  # fmt: skip
        if pos.any():
            boxes = self.coder.decode(anchors[None].expand(b, -1, -1)[pos], reg[pos])
            loss_bbox = giou_loss(boxes, assigned[pos], avg_factor=avg)
        else:
            loss_bbox = reg.sum() * 0
        k = self.loss_index
        feats_out = None
        if self.with_coord_feat:  # location features, repeated over the A anchors of the location
            flat = flatten_levels(feats, feats[0].shape[1])  # (B, sum hw, C)
            feats_out = list(flat.repeat_interleave(self.num_anchors, dim=1).unbind(0))
        positives = AuxPositives(head=self.name, coords=[anchors] * b, labels=list(labels.unbind(0)),
                                 targets=list(assigned.unbind(0)), feats=feats_out)  # fmt: skip
        return {f"loss_cls{k}": loss_cls, f"loss_bbox{k}": loss_bbox}, positives


def build(cfg: RetinaNetConfig, ctx: AuxBuildContext) -> RetinaNetHead:
    """The table's builder (pipeline/models/aux_heads/table.py)."""
    return RetinaNetHead(ctx.num_classes, ctx.embed_dims, ctx.embed_dims, cfg, ctx.strides_of(cfg.strides),
                         ctx.loss_index, ctx.with_coord_feat)  # fmt: skip
