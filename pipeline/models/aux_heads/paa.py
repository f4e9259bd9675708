"""PAA auxiliary head (paper Table 8; Kim & Lee 2020, Probabilistic Anchor Assignment, with mmdet `PAAHead` numerics).

Architecture: the aux ATSS head's (mmdet's PAAHead subclasses ATSSHead, and so does this one; same key names):
`stacked_convs` (1) conv + GN + ReLU per tower, 3x3 `atss_cls` (nc, sigmoid, bias prior 0.01), `atss_reg` (4
deltas), `atss_centerness` (1: PAA's IoU prediction), a learnable `Scale` per level. One anchor per location,
size 8 x stride (octave_base_scale 8, 1 scale, ratio 1), DeltaXYWH (stds 0.1, 0.1, 0.2, 0.2).

Training, per image (every anchor of the batch maps valid, as the aux ATSS):
  1. candidates: MaxIoUAssigner(pos = neg = 0.1, min_pos_iou 0, low-quality matches);
  2. score of each candidate = cls_weight x sum_c focal(cls, onehot) + bbox_weight x (1 - GIoU(decode, gt))
     (mmdet's loss modules with reduction "none": weights 1 and 1.3), detached;
  3. `task_modules.paa_assigner.paa_positives`: per GT, the top 9 per level, a 2-component GMM on their scores,
     the low component up to its densest score stay positive; all other candidates become negatives.
Losses (unweighted; table base weights cls 1, bbox 1.3, iou 0.5, x lambda2 x 6), P = #positives of the batch:
  loss_cls{k}  = sum focal(cls, onehot) over every anchor / max(P, B)
  loss_bbox{k} = sum_pos t (1 - GIoU(decode, gt)) / sum_pos t,      t = IoU(decode.detach(), gt) (clamped >= 1e-12)
  loss_iou{k}  = sum_pos BCE(iou logit, t) / P
The normalisers are this worker's, as mmdet's PAAHead (no reduce_mean over ranks, unlike its ATSS head).

Export: AuxPositives(head="paa", coords = all anchors (N, 4) xyxy, labels bg = nc (negatives and dropped
candidates), targets = the kept positives' GT xyxy (zeros elsewhere), feats = with_coord_feat: the adapter feature
at each anchor's location (N, C)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss as tv_sigmoid_focal_loss

from pipeline.models.aux_heads.atss import ATSSHead
from pipeline.models.aux_heads.base import AuxPositives
from pipeline.models.aux_heads.dense import flatten_levels
from pipeline.models.aux_heads.faster_rcnn import gt_to_pixels
from pipeline.models.aux_heads.table import AuxBuildContext, PAAConfig
from pipeline.models.box_ops import aligned_iou
from pipeline.models.losses import sigmoid_focal_loss, weight_reduce_loss
from pipeline.models.task_modules.anchors import cached_grid_anchors
from pipeline.models.task_modules.batching import pad_gts
from pipeline.models.task_modules.max_iou_assigner import MaxIoUAssigner
from pipeline.models.task_modules.paa_assigner import paa_positives

_IOU_EPS = 1e-12  # mmdet PAAHead's EPS: floor of the IoU weights of the box loss


class PAAHead(ATSSHead):
    """forward(feats) -> per level cls (B, nc, h, w), deltas (B, 4, h, w), IoU logits (B, 1, h, w);
    forward_train(feats, targets, img_sizes) -> (unweighted losses, AuxPositives)."""

    name = "paa"

    def __init__(self, num_classes: int = 80, in_channels: int = 256, feat_channels: int = 256,
                 cfg: PAAConfig | None = None, strides: tuple[int, ...] = (4, 8, 16, 32, 64, 128),
                 loss_index: int = 0, with_coord_feat: bool = False) -> None:  # fmt: skip
        cfg = cfg if cfg is not None else PAAConfig()
        super().__init__(num_classes, in_channels, feat_channels, cfg.stacked_convs, strides, cfg.anchor_scale,
                         cfg.topk, cfg.coder_stds, loss_index=loss_index, prior_prob=cfg.prior_prob,
                         focal_alpha=cfg.focal_alpha, focal_gamma=cfg.focal_gamma,
                         with_coord_feat=with_coord_feat)  # fmt: skip
        self.assigner = MaxIoUAssigner(cfg.candidate_iou, cfg.candidate_iou, 0.0, match_low_quality=True)
        self.topk = cfg.topk
        self.score_weights = (cfg.cls_weight, cfg.bbox_weight)  # mmdet's loss weights inside the PAA score

    @torch.no_grad()
    def candidate_scores(self, cls: Tensor, labels: Tensor, giou_loss_elems: Tensor) -> Tensor:
        """cls (B, N, nc) logits, candidate labels (B, N) (bg = nc), the unreduced GIoU loss of the decoded boxes
        against their GT (B, N) -> (B, N) cls_weight x focal summed over classes + bbox_weight x GIoU loss
        (meaningful on candidates)."""
        nc = self.num_classes
        onehot = F.one_hot(labels, nc + 1)[..., :nc].to(cls.dtype)
        focal = tv_sigmoid_focal_loss(cls, onehot, self.focal_alpha, self.focal_gamma, reduction="none").sum(-1)
        return self.score_weights[0] * focal + self.score_weights[1] * giou_loss_elems

    def forward_train(
        self, feats: list[Tensor], targets: list[dict[str, Tensor]], img_sizes: Tensor
    ) -> tuple[dict[str, Tensor], AuxPositives]:
        cls_scores, bbox_preds, iou_preds = self(feats)
        b, nc, device = cls_scores[0].shape[0], self.num_classes, cls_scores[0].device
        sizes = [(int(m.shape[-2]), int(m.shape[-1])) for m in cls_scores]
        level_anchors = cached_grid_anchors(sizes, self.strides, (self.anchor_scale,), (1.0,), device)
        anchors = torch.cat(level_anchors)  # (N, 4)
        gt, gt_lab, gt_valid = pad_gts(*gt_to_pixels(targets, img_sizes, device))  # (B, G, 4), (B, G), (B, G)
        res = self.assigner.assign_batch(anchors, gt, gt_lab, gt_valid)  # initial candidates, (B, N)
        cand = res.gt_inds > 0
        assigned = gt.gather(1, (res.gt_inds - 1).clamp(min=0)[..., None].expand(-1, -1, 4))  # (B, N, 4)

        cls = flatten_levels(cls_scores, nc).float()  # (B, N, nc)
        flat_anchors = anchors[None].expand(b, -1, -1)
        boxes = self.coder.decode(flat_anchors.reshape(-1, 4), flatten_levels(bbox_preds, 4).reshape(-1, 4))
        boxes = boxes.reshape(b, -1, 4)
        iou_logits = flatten_levels(iou_preds, 1).squeeze(-1).float()  # (B, N)
        # a non-candidate's stand-in GT is its own anchor: finite values, masked below
        gt_or_anchor = torch.where(cand[..., None], assigned, flat_anchors)
        # 1 - GIoU of every anchor's box, computed once: the PAA score (detached) and the box loss share it
        giou_elems = 1 - aligned_iou(boxes.reshape(-1, 4), gt_or_anchor.reshape(-1, 4), mode="giou")  # (B N,)
        scores = self.candidate_scores(cls.detach(), torch.where(cand, res.labels, nc),
                                       giou_elems.detach().reshape(b, -1))  # fmt: skip
        pos = paa_positives(scores, res.gt_inds, [a.shape[0] for a in level_anchors], gt.shape[1], self.topk)
        labels = torch.where(pos, res.labels, nc)
        num_pos = pos.sum().to(torch.float32)  # a device tensor: no host sync

        loss_cls = sigmoid_focal_loss(cls.reshape(-1, nc), labels.reshape(-1), (res.gt_inds >= 0).reshape(-1).float(),
                                      num_pos.clamp(min=b), self.focal_alpha, self.focal_gamma)  # fmt: skip
        iou_t = aligned_iou(boxes.detach().reshape(-1, 4), gt_or_anchor.reshape(-1, 4)) * pos.reshape(-1)
        pos_f = pos.reshape(-1).float()
        # mmdet GIoULoss's reduction (no positive: the weights are all 0 and so is the sum)
        loss_bbox = weight_reduce_loss(giou_elems, iou_t.clamp(min=_IOU_EPS) * pos_f, "mean", iou_t.sum())
        bce = F.binary_cross_entropy_with_logits(iou_logits.reshape(-1), iou_t, reduction="none")
        loss_iou = weight_reduce_loss(bce, pos_f, "mean", num_pos)
        feats_out = None
        if self.with_coord_feat:
            feats_out = list(flatten_levels(feats, feats[0].shape[1]).unbind(0))
        kept_gt = torch.where(pos[..., None], assigned, assigned.new_zeros(()))
        positives = AuxPositives(head=self.name, coords=[anchors] * b, labels=list(labels.unbind(0)),
                                 targets=list(kept_gt.unbind(0)), feats=feats_out)  # fmt: skip
        k = self.loss_index
        return {f"loss_cls{k}": loss_cls, f"loss_bbox{k}": loss_bbox, f"loss_iou{k}": loss_iou}, positives


def build(cfg: PAAConfig, ctx: AuxBuildContext) -> PAAHead:
    """The table's builder (pipeline/models/aux_heads/table.py)."""
    return PAAHead(ctx.num_classes, ctx.embed_dims, ctx.embed_dims, cfg, ctx.strides_of(cfg.strides),
                   ctx.loss_index, ctx.with_coord_feat)  # fmt: skip
