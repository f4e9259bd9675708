"""ATSS auxiliary head of Co-DETR (`CoATSSHead`, CO_DETR_SPEC.md 2.2), numerics of the mmdet 3.x port.

Architecture (authors' key names under `bbox_head.0.`): one 3x3 conv (no bias) + GN(32) + ReLU per tower
(`cls_convs.0.conv/gn`, `reg_convs.0.conv/gn`), then 3x3 convs `atss_cls` (nc), `atss_reg` (4), `atss_centerness`
(1) and a learnable `Scale` per level (`scales.{i}.scale`) on the box deltas. Init N(0, 0.01), cls bias prior 0.01.

Training (per image): mmdet anchors (1 per location, size 8 * stride, centre (x s, y s)). Every anchor of the
batch maps is valid by default (pad_size_divisor=0), which is what the golden reference computes (checked:
loss_cls1 differs by 0.1 otherwise); pad_size_divisor=d > 0 instead ignores anchors outside the image's own
padded extent ceil(size / d) * d (mmdet `valid_flags` with a per-image pad_shape, as mmdet's data preprocessor
with pad_size_divisor=32 would set it). ATSSAssigner(topk=9) on the valid anchors. Losses (the authors' keys
with the head's index, default 1):

  loss_cls{i}        = sum focal(cls, onehot) over valid anchors / N,   N = reduce_mean(sum_b max(#pos_b, 1))
  loss_bbox{i}       = sum c * (1 - GIoU(decode(anchor, delta), gt)) / max(reduce_mean(sum c), 1)
  loss_centerness{i} = sum BCE(centerness logit, c) / N
with c = centerness target of the positive anchor w.r.t. its GT, and decode = DeltaXYWH (stds 0.1, 0.1, 0.2, 0.2).
mmdet sums per-level terms; summing all anchors at once is the same computation up to float summation order.
The terms are unweighted; the table's weights (cls_weight 1, bbox_weight 2, centerness_weight 1, x lambda2 x 6)
are applied by `loss_weights.weigh`.

Export: AuxPositives(head="atss", coords = all anchors (N, 4) xyxy, labels (N,) bg = nc (also for invalid anchors),
targets (N, 4) assigned GT xyxy (zeros for negatives), feats=None). With `with_coord_feat=True` (Co-Deformable,
spec 3.1 point 5) feats = the adapter feature at each anchor's location, (N, C) per image: the input maps flattened
level-major and row-major, which is the anchor order (one anchor per location).
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
from pipeline.models.aux_heads.table import ATSSConfig, AuxBuildContext
from pipeline.models.box_ops import DeltaXYWHCoder, box_cxcywh_to_xyxy
from pipeline.models.fed_loss import fed_class_mask
from pipeline.models.losses import giou_loss, reduce_mean, sigmoid_focal_loss, weight_reduce_loss
from pipeline.models.task_modules.anchors import cached_grid_anchors, cached_valid_flags
from pipeline.models.task_modules.atss_assigner import ATSSAssigner
from pipeline.models.task_modules.batching import pad_gts


def centerness_target(anchors: Tensor, gts: Tensor) -> Tensor:
    """FCOS/ATSS centerness of anchor centres inside their GT: anchors, gts (P, 4) xyxy -> (P,)."""
    cx = (anchors[:, 2] + anchors[:, 0]) / 2
    cy = (anchors[:, 3] + anchors[:, 1]) / 2
    lr = torch.stack([cx - gts[:, 0], gts[:, 2] - cx], dim=1)
    tb = torch.stack([cy - gts[:, 1], gts[:, 3] - cy], dim=1)
    return torch.sqrt((lr.min(dim=-1).values / lr.max(dim=-1).values) * (tb.min(dim=-1).values / tb.max(dim=-1).values))


class ATSSHead(AuxHead):
    """ATSS head on the adapter maps. forward_train(feats, targets, img_sizes) -> (losses, AuxPositives)."""

    name = "atss"

    def __init__(
        self,
        num_classes: int = 80,
        in_channels: int = 256,
        feat_channels: int = 256,
        stacked_convs: int = 1,
        strides: Sequence[int] = (4, 8, 16, 32, 64, 128),
        anchor_scale: float = 8.0,
        topk: int = 9,
        target_stds: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2),
        loss_index: int = 1,
        pad_size_divisor: int = 0,
        prior_prob: float = 0.01,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        with_coord_feat: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.with_coord_feat = with_coord_feat  # export the adapter feature of every anchor (Co-Deformable)
        self.strides = tuple(int(s) for s in strides)
        self.anchor_scale = float(anchor_scale)
        self.loss_index = loss_index  # suffix of the loss keys: the authors' K order, RoI heads first
        self.pad_size_divisor = pad_size_divisor
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.assigner = ATSSAssigner(topk=topk)
        self.coder = DeltaXYWHCoder(means=(0.0, 0.0, 0.0, 0.0), stds=target_stds)

        self.cls_convs = conv_tower(ConvGNReLU, in_channels, feat_channels, stacked_convs)
        self.reg_convs = conv_tower(ConvGNReLU, in_channels, feat_channels, stacked_convs)
        self.atss_cls = nn.Conv2d(feat_channels, num_classes, 3, padding=1)
        self.atss_reg = nn.Conv2d(feat_channels, 4, 3, padding=1)
        self.atss_centerness = nn.Conv2d(feat_channels, 1, 3, padding=1)
        self.scales = nn.ModuleList([Scale(1.0) for _ in self.strides])
        self.reset_parameters(prior_prob)

    def reset_parameters(self, prior_prob: float = 0.01) -> None:
        """mmdet init_cfg: Normal(std 0.01, bias 0) on every Conv2d, atss_cls bias = -log((1 - p) / p)."""
        init_dense_head(self, self.atss_cls, prior_prob)

    def forward(self, feats: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """feats: L maps (B, C, h_l, w_l) -> per level cls (B, nc, h, w), deltas (B, 4, h, w) float32,
        centerness (B, 1, h, w)."""
        check_levels(self, feats, self.strides)
        cls_scores, bbox_preds, centernesses = [], [], []
        for x, scale in zip(feats, self.scales):
            cls_feat, reg_feat = self.cls_convs(x), self.reg_convs(x)
            cls_scores.append(self.atss_cls(cls_feat))
            bbox_preds.append(scale(self.atss_reg(reg_feat)).float())
            centernesses.append(self.atss_centerness(reg_feat))
        return cls_scores, bbox_preds, centernesses

    @torch.no_grad()
    def get_targets(
        self, anchors: Tensor, num_level_anchors: list[int], flags: list[Tensor], gt_boxes: Tensor, gt_labels: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, int]:
        """One image: anchors (N, 4), flags per level (n_l,) bool, GT (G, 4) xyxy pixels, (G,) labels ->
        labels (N,) bg = nc, label_weights (N,) (1 on valid anchors), targets (N, 4) GT xyxy, #pos."""
        valid = torch.cat(flags)
        num_level_valid = [int(f.sum()) for f in flags]
        result = self.assigner.assign(anchors[valid], num_level_valid, gt_boxes, gt_labels)
        n = anchors.shape[0]
        labels = anchors.new_full((n,), self.num_classes, dtype=torch.long)
        label_weights = valid.to(anchors.dtype)
        targets = anchors.new_zeros((n, 4))
        valid_idx = valid.nonzero().squeeze(1)
        pos = result.pos_mask
        pos_idx = valid_idx[pos]
        labels[pos_idx] = result.labels[pos]
        targets[pos_idx] = gt_boxes[result.gt_inds[pos] - 1]
        return labels, label_weights, targets, int(pos.sum())

    def _pad(self, size: list[int]) -> tuple[int, int]:
        """An image's padded extent for the valid flags: ceil to pad_size_divisor, or everything (divisor 0)."""
        h, w = (int(v) for v in size)
        if self.pad_size_divisor > 0:
            d = self.pad_size_divisor
            return (-(-h // d) * d, -(-w // d) * d)
        return (10**9, 10**9)  # every location of the batch maps is valid

    @torch.no_grad()
    def get_targets_batch(
        self, anchors: Tensor, num_level_anchors: list[int], flags: list[Tensor], targets: list[dict[str, Tensor]],
        img_sizes: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
        """`get_targets` for every image at once when all share the valid flags: anchors (N, 4), flags per level,
        targets' boxes cxcywh normalised by img_sizes (B, 2) (h, w) -> labels (B, N) bg = nc, label_weights (B, N),
        targets (B, N, 4) GT xyxy pixels, #pos (B,) long. Equal to `get_targets` per image."""
        device = anchors.device
        gt, gt_labels, gt_valid = pad_gts([t["boxes"].to(device=device, dtype=torch.float32) for t in targets],
                                          [t["labels"].to(device) for t in targets])  # fmt: skip
        hw = img_sizes.to(device=device, dtype=torch.float32)
        gt_xyxy = box_cxcywh_to_xyxy(gt) * torch.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], 1)[:, None]
        valid = torch.cat(flags)
        all_valid = self.pad_size_divisor <= 0 or bool(valid.all())  # divisor 0: all valid, no read-back
        num_level_valid = num_level_anchors if all_valid else [int(f.sum()) for f in flags]
        res = self.assigner.assign_batch(anchors if all_valid else anchors[valid], num_level_valid, gt_xyxy,
                                         gt_labels, gt_valid)  # (B, N_valid)  # fmt: skip
        pos = res.gt_inds > 0
        lab_v = torch.where(pos, res.labels, self.num_classes)
        tgt_v = gt_xyxy.gather(1, (res.gt_inds - 1).clamp(min=0)[..., None].expand(-1, -1, 4))
        tgt_v = torch.where(pos[..., None], tgt_v, tgt_v.new_zeros(()))
        b, n = gt.shape[0], anchors.shape[0]
        if all_valid:
            labels, tgt = lab_v, tgt_v
        else:
            labels = lab_v.new_full((b, n), self.num_classes)
            tgt = tgt_v.new_zeros((b, n, 4))
            labels[:, valid], tgt[:, valid] = lab_v, tgt_v
        return labels, valid.to(anchors.dtype)[None].expand(b, -1), tgt, pos.sum(1)

    def forward_train(
        self, feats: list[Tensor], targets: list[dict[str, Tensor]], img_sizes: Tensor
    ) -> tuple[dict[str, Tensor], AuxPositives]:
        cls_scores, bbox_preds, centernesses = self(feats)
        device = cls_scores[0].device
        b = cls_scores[0].shape[0]
        sizes = [(int(m.shape[-2]), int(m.shape[-1])) for m in cls_scores]
        level_anchors = cached_grid_anchors(sizes, self.strides, (self.anchor_scale,), (1.0,), device)
        num_level_anchors = [a.shape[0] for a in level_anchors]
        anchors = torch.cat(level_anchors)  # (N, 4)

        # valid flags per image: they depend on the image sizes only with a pad_size_divisor (no read-back without)
        pads = [self._pad(s) for s in img_sizes.tolist()] if self.pad_size_divisor > 0 else [self._pad((0, 0))] * b
        flags = [cached_valid_flags(sizes, self.strides, p, 1, device) for p in pads]
        if all(p == pads[0] for p in pads):  # every image has the same valid anchors (always with the default
            # pad_size_divisor 0): one batched assignment, the same result as per image
            labels_t, weights_t, targets_t, num_pos = self.get_targets_batch(
                anchors, num_level_anchors, flags[0], targets, img_sizes
            )
            num_pos_total = num_pos.clamp(min=1).sum()  # mmdet SamplingResult.num_pos = max(#pos, 1), on device
            all_labels, all_targets = list(labels_t.unbind(0)), list(targets_t.unbind(0))
        else:
            all_labels, all_weights, all_targets, num_pos_total = [], [], [], 0
            for i in range(b):
                h, w = (int(v) for v in img_sizes[i])
                gt = targets[i]["boxes"].to(device=device, dtype=torch.float32)
                gt_xyxy = box_cxcywh_to_xyxy(gt) * gt.new_tensor([w, h, w, h])
                labels, weights, tgt, num_pos_i = self.get_targets(
                    anchors, num_level_anchors, flags[i], gt_xyxy, targets[i]["labels"].to(device)
                )
                all_labels.append(labels)
                all_weights.append(weights)
                all_targets.append(tgt)
                num_pos_total += max(num_pos_i, 1)  # mmdet SamplingResult.num_pos = max(#pos, 1)
            labels_t, weights_t, targets_t = torch.stack(all_labels), torch.stack(all_weights), torch.stack(all_targets)

        losses = self.loss(
            anchors,
            cls_scores,
            bbox_preds,
            centernesses,
            labels_t,
            weights_t,
            targets_t,
            num_pos_total,
            class_mask=fed_class_mask(self, [t["labels"] for t in targets]),  # FedLoss (LVIS) or None
        )
        coord_feats = None
        if self.with_coord_feat:  # (B, N, C): levels flattened level-major, row-major = anchor order
            coord_feats = list(flatten_levels(feats, feats[0].shape[1]).unbind(0))
        positives = AuxPositives(
            head=self.name, coords=[anchors] * b, labels=all_labels, targets=all_targets, feats=coord_feats
        )
        return losses, positives

    def loss(
        self,
        anchors: Tensor,
        cls_scores: list[Tensor],
        bbox_preds: list[Tensor],
        centernesses: list[Tensor],
        labels: Tensor,
        label_weights: Tensor,
        bbox_targets: Tensor,
        num_pos_total: int | Tensor,
        class_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """anchors (N, 4); per-level predictions; labels (B, N) bg = nc; label_weights (B, N); bbox_targets
        (B, N, 4) GT xyxy; num_pos_total = sum_b max(#pos_b, 1); class_mask (nc,): FedLoss selection, the focal
        loss sums over those classes only (pipeline/models/fed_loss.py). Returns the three weighted losses."""
        b = labels.shape[0]
        nc = self.num_classes
        cls = flatten_levels(cls_scores, nc).float()  # (B, N, nc)
        deltas = flatten_levels(bbox_preds, 4).float()  # (B, N, 4)
        ctr = flatten_levels(centernesses, 1).squeeze(-1).float()  # (B, N)

        # loss normalisers stay tensors on the device (no host sync)
        avg_factor = reduce_mean(torch.as_tensor(num_pos_total, dtype=torch.float32, device=cls.device))

        loss_cls = sigmoid_focal_loss(
            cls.reshape(-1, nc),
            labels.reshape(-1),
            weight=label_weights.reshape(-1) if class_mask is None else label_weights.reshape(-1, 1) * class_mask,
            avg_factor=avg_factor,
            alpha=self.focal_alpha,
            gamma=self.focal_gamma,
        )
        # The positives' box and centerness losses over every anchor, weighted by the positive mask (fixed shapes:
        # no bool-mask indexing, no `pos.any()` read-back). A negative's stand-in target is its own anchor, so
        # its centerness (1) and GIoU are finite before the zero weight; the sums equal those over the positives.
        pos = ((labels >= 0) & (labels < nc)).reshape(-1)  # (B N,)
        flat_anchors = anchors[None].expand(b, -1, -1).reshape(-1, 4)
        gt = torch.where(pos[:, None], bbox_targets.reshape(-1, 4), flat_anchors)
        ctr_targets = centerness_target(flat_anchors, gt) * pos  # (B N,), 0 off the positives
        pred_boxes = self.coder.decode(flat_anchors, deltas.reshape(-1, 4))
        loss_bbox = giou_loss(pred_boxes, gt, weight=ctr_targets, avg_factor=1.0)
        bce = F.binary_cross_entropy_with_logits(ctr.reshape(-1), ctr_targets, reduction="none")
        loss_ctr = weight_reduce_loss(bce, pos.to(bce.dtype), "mean", avg_factor)
        bbox_avg_factor = reduce_mean(ctr_targets.sum().detach()).clamp(min=1)
        loss_bbox = loss_bbox / bbox_avg_factor
        k = self.loss_index
        return {
            f"loss_cls{k}": loss_cls,
            f"loss_bbox{k}": loss_bbox,
            f"loss_centerness{k}": loss_ctr,
        }


def build(cfg: ATSSConfig, ctx: AuxBuildContext) -> ATSSHead:
    """The table's builder (pipeline/models/aux_heads/table.py)."""
    return ATSSHead(
        ctx.num_classes, ctx.embed_dims, ctx.embed_dims, cfg.stacked_convs, ctx.strides_of(cfg.strides),
        cfg.anchor_scale, cfg.topk, cfg.coder_stds, loss_index=ctx.loss_index, focal_alpha=cfg.focal_alpha,
        focal_gamma=cfg.focal_gamma, with_coord_feat=ctx.with_coord_feat,
    )  # fmt: skip
