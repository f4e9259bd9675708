"""GFL auxiliary head (paper Table 8; Li et al. 2020, Generalized Focal Loss, with mmdet `GFLHead` numerics).

Architecture (mmdet key names): `stacked_convs` (1, as the authors' aux ATSS) 3x3 conv (no bias) + GN(32) + ReLU per
tower (`cls_convs.i`, `reg_convs.i`), 3x3 `gfl_cls` (nc, sigmoid, bias prior 0.01; the joint class-IoU score) and
`gfl_reg` (4 (reg_max + 1) logits: a discrete distribution over distances 0..reg_max, in strides, per side), a
learnable `Scale` per level (`scales.l.scale`). Init N(0, 0.01).

Anchors and assignment as the aux ATSS: one anchor per location, size 8 x stride, centre (x s, y s) (mmdet v2),
ATSSAssigner(topk 9), every anchor of the batch maps valid. Per positive anchor (centre p, stride s, GT g):
  distances d = Integral(softmax(gfl_reg)) = sum_i i softmax_i   (per side, stride units)
  box = (p / s - d_lt, p / s + d_rb);  IoU score = IoU(box.detach(), g / s);  w = max_c sigmoid(cls).detach()
Losses (unweighted; table base weights: cls 1, bbox 2, dfl 0.25, x lambda2 x 6):
  loss_cls{k} = sum QFL(cls, label, IoU score) over anchors / N,   N = max(reduce_mean(sum_b max(#pos_b, 1)), 1)
  loss_bbox{k} = sum_pos w (1 - GIoU(box, g / s)) / W,            W = max(reduce_mean(sum_pos w), 1)
  loss_dfl{k}  = sum_pos w mean_sides DFL(gfl_reg, clamp(target distance, 0, reg_max - 0.01)) / W
DFL(logits, y) = CE(logits, floor y) (floor y + 1 - y) + CE(logits, floor y + 1) (y - floor y).

Export: as the aux ATSS, AuxPositives(head="gfl", coords = all anchors (N, 4), labels bg = nc, targets = assigned
GT xyxy, feats = with_coord_feat: the adapter feature at each anchor's location).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.aux_heads.base import AuxHead, AuxPositives
from pipeline.models.aux_heads.dense import (
    ConvGNReLU,
    Scale,
    check_levels,
    conv_tower,
    flatten_levels,
    init_dense_head,
)
from pipeline.models.aux_heads.faster_rcnn import gt_to_pixels
from pipeline.models.aux_heads.table import AuxBuildContext, GFLConfig
from pipeline.models.box_ops import aligned_iou
from pipeline.models.losses import giou_loss, quality_focal_loss, reduce_mean, weight_reduce_loss
from pipeline.models.task_modules.anchors import cached_grid_anchors
from pipeline.models.task_modules.atss_assigner import ATSSAssigner
from pipeline.models.task_modules.batching import pad_gts


def distribution_focal_loss(logits: Tensor, target: Tensor) -> Tensor:
    """logits (N, reg_max + 1), target (N,) float distance in [0, reg_max) -> (N,) unreduced DFL."""
    left = target.long()
    w_left = left.float() + 1 - target
    return F.cross_entropy(logits, left, reduction="none") * w_left + F.cross_entropy(
        logits, left + 1, reduction="none"
    ) * (1 - w_left)


class GFLHead(AuxHead):
    """forward(feats) -> per level cls (B, nc, h, w), distribution logits (B, 4 (reg_max + 1), h, w);
    forward_train(feats, targets, img_sizes) -> (unweighted losses, AuxPositives)."""

    name = "gfl"

    def __init__(
        self,
        num_classes: int = 80,
        in_channels: int = 256,
        feat_channels: int = 256,
        cfg: GFLConfig | None = None,
        strides: Sequence[int] = (4, 8, 16, 32, 64, 128),
        loss_index: int = 0,
        with_coord_feat: bool = False,
    ) -> None:
        super().__init__()
        cfg = cfg if cfg is not None else GFLConfig()
        self.num_classes = num_classes
        self.strides = tuple(int(s) for s in strides)
        self.anchor_scale = float(cfg.anchor_scale)
        self.reg_max = cfg.reg_max
        self.qfl_beta = cfg.qfl_beta
        self.loss_index = loss_index
        self.with_coord_feat = with_coord_feat
        self.assigner = ATSSAssigner(topk=cfg.topk)
        chans = [in_channels] + [feat_channels] * cfg.stacked_convs
        self.cls_convs = conv_tower(ConvGNReLU, in_channels, feat_channels, cfg.stacked_convs)
        self.reg_convs = conv_tower(ConvGNReLU, in_channels, feat_channels, cfg.stacked_convs)
        self.gfl_cls = nn.Conv2d(chans[-1], num_classes, 3, padding=1)
        self.gfl_reg = nn.Conv2d(chans[-1], 4 * (cfg.reg_max + 1), 3, padding=1)
        self.scales = nn.ModuleList([Scale(1.0) for _ in self.strides])
        self.register_buffer("project", torch.arange(cfg.reg_max + 1, dtype=torch.float32), persistent=False)
        init_dense_head(self, self.gfl_cls, cfg.prior_prob)

    def forward(self, feats: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        check_levels(self, feats, self.strides)
        cls_scores, regs = [], []
        for x, scale in zip(feats, self.scales):
            c, r = self.cls_convs(x), self.reg_convs(x)
            cls_scores.append(self.gfl_cls(c))
            regs.append(scale(self.gfl_reg(r)).float())
        return cls_scores, regs

    def forward_train(
        self, feats: list[Tensor], targets: list[dict[str, Tensor]], img_sizes: Tensor
    ) -> tuple[dict[str, Tensor], AuxPositives]:
        cls_scores, regs = self(feats)
        b, nc, device, n_bins = cls_scores[0].shape[0], self.num_classes, cls_scores[0].device, self.reg_max + 1
        sizes = [(int(m.shape[-2]), int(m.shape[-1])) for m in cls_scores]
        level_anchors = cached_grid_anchors(sizes, self.strides, (self.anchor_scale,), (1.0,), device)
        anchors = torch.cat(level_anchors)  # (N, 4)
        anchor_strides = torch.cat([a.new_full((a.shape[0],), float(s)) for a, s in zip(level_anchors, self.strides)])
        gt_boxes, gt_labels = gt_to_pixels(targets, img_sizes, device)
        gt, gt_lab, gt_valid = pad_gts(gt_boxes, gt_labels)  # (B, G, 4), (B, G), (B, G): one batched assignment
        res = self.assigner.assign_batch(anchors, [a.shape[0] for a in level_anchors], gt, gt_lab, gt_valid)
        pos = res.gt_inds > 0  # (B, N)
        labels_t = torch.where(pos, res.labels, nc)
        assigned_t = gt.gather(1, (res.gt_inds - 1).clamp(min=0)[..., None].expand(-1, -1, 4))
        assigned_t = torch.where(pos[..., None], assigned_t, assigned_t.new_zeros(()))  # (B, N, 4)
        num_pos = pos.sum(1).clamp(min=1).sum()  # mmdet: sum_b max(#pos_b, 1); a device tensor: no host sync

        cls = flatten_levels(cls_scores, nc).float()  # (B, N, nc)
        reg = flatten_levels(regs, 4 * n_bins)  # (B, N, 4 bins)
        pos = labels_t < nc
        scores = cls.new_zeros(labels_t.shape)
        if pos.any():
            stride = anchor_strides[None].expand(b, -1)[pos][:, None]  # (P, 1)
            centre = ((anchors[:, :2] + anchors[:, 2:]) / 2)[None].expand(b, -1, -1)[pos] / stride  # stride units
            gt = assigned_t[pos] / stride
            logits = reg[pos].reshape(-1, n_bins)  # (4P, bins)
            dist = (logits.softmax(-1) @ self.project).reshape(-1, 4)  # Integral: expected distance per side
            box = torch.cat([centre - dist[:, :2], centre + dist[:, 2:]], 1)
            scores[pos] = aligned_iou(box.detach(), gt)
            weight = cls.detach().sigmoid().max(-1).values[pos]  # (P,)
            avg = reduce_mean(weight.sum()).clamp(min=1)
            loss_bbox = giou_loss(box, gt, weight=weight, avg_factor=1.0) / avg
            target = torch.cat([centre - gt[:, :2], gt[:, 2:] - centre], 1).clamp(min=0, max=self.reg_max - 0.01)
            dfl = distribution_focal_loss(logits, target.reshape(-1))
            loss_dfl = weight_reduce_loss(dfl, weight[:, None].expand(-1, 4).reshape(-1), avg_factor=4.0) / avg
        else:
            loss_bbox, loss_dfl = reg.sum() * 0, reg.sum() * 0
        n_avg = reduce_mean(num_pos.to(torch.float32)).clamp(min=1.0)
        qfl = quality_focal_loss(cls.reshape(-1, nc), labels_t.reshape(-1), scores.reshape(-1), self.qfl_beta)
        loss_cls = weight_reduce_loss(qfl, avg_factor=n_avg)
        feats_out = None
        if self.with_coord_feat:
            feats_out = list(flatten_levels(feats, feats[0].shape[1]).unbind(0))
        positives = AuxPositives(head=self.name, coords=[anchors] * b, labels=list(labels_t.unbind(0)),
                                 targets=list(assigned_t.unbind(0)), feats=feats_out)  # fmt: skip
        k = self.loss_index
        return {f"loss_cls{k}": loss_cls, f"loss_bbox{k}": loss_bbox, f"loss_dfl{k}": loss_dfl}, positives


def build(cfg: GFLConfig, ctx: AuxBuildContext) -> GFLHead:
    """The table's builder (pipeline/models/aux_heads/table.py)."""
    return GFLHead(ctx.num_classes, ctx.embed_dims, ctx.embed_dims, cfg, ctx.strides_of(cfg.strides),
                   ctx.loss_index, ctx.with_coord_feat)  # fmt: skip
