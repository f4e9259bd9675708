"""RoI head of the Faster R-CNN auxiliary head (CO_DETR_SPEC.md 2.3; mmdet 3.x `CoStandardRoIHead` with
`SingleRoIExtractor` and `Shared2FCBBoxHead`).

Per image: MaxIoUAssigner(0.5, 0.5, min_pos 0.5, no low-quality matches) on the RPN proposals, then
RandomSampler(512, 25% positives, GT boxes added as proposals, so GT rows come first among the positives).
The sampled RoIs of image i are [positives (ascending index), negatives (ascending index)]. Both steps run for the
whole batch at once (`sample_rois`: the same assignment as per image, the sampler's quotas and distribution).

RoI features: RoIAlign 7x7 (`torchvision.ops.roi_align`, sampling_ratio 0 = adaptive, aligned=True as mmcv's
`RoIAlign` default, spatial_scale 1 / stride) on the level floor(log2(sqrt(w h) / finest_scale + 1e-6)) clamped to
[0, L - 1], over the first L = 5 adapter maps (strides 4..64). torchvision's MultiScaleRoIAlign maps levels
differently (canonical 224 at level 4), so the mmdet rule is written here.

Box head (authors' keys `roi_head.0.bbox_head.*`): flatten 256*7*7 -> `shared_fcs.0` (1024) -> ReLU ->
`shared_fcs.1` (1024) -> ReLU -> `fc_cls` (nc + 1, softmax, bg = nc) and `fc_reg` (4 nc, class-specific deltas,
stds 0.1, 0.1, 0.2, 0.2). Init: shared_fcs Xavier-uniform, fc_cls N(0, 0.01), fc_reg N(0, 0.001), biases 0.

Losses (mmdet `BBoxHead.loss`, no all-reduce), R = number of sampled RoIs in the batch:
  loss_cls{k}  = sum CE(cls, label) / max(R, 1)
  loss_bbox{k} = sum_pos (1 - GIoU(decode(roi, delta[label]), gt)) / R   (reg_decoded_bbox=True)
  acc{k}       = 100 * mean(argmax cls == label), detached metric, not a loss.

Export (`CoStandardRoIHead.loss`): M = min(2000, min_i #sampled RoIs of image i); per image the first M sampled
RoIs (xyxy pixels), their labels (bg = nc), their targets (assigned GT xyxy, zeros for negatives) and the
mean-pooled 7x7 RoI feature (M, C).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.box_ops import DeltaXYWHCoder
from pipeline.models.fed_loss import fed_class_mask, fed_softmax_cross_entropy
from pipeline.models.layers.roi_align import roi_align
from pipeline.models.losses import giou_loss, weight_reduce_loss
from pipeline.models.task_modules.batching import pad_gts

if TYPE_CHECKING:
    from pipeline.models.task_modules.max_iou_assigner import MaxIoUAssigner
    from pipeline.models.task_modules.random_sampler import RandomSampler


def map_roi_levels(rois: Tensor, num_levels: int, finest_scale: float = 56.0) -> Tensor:
    """mmdet `SingleRoIExtractor.map_roi_levels`: rois (R, 4) xyxy -> (R,) long level in [0, num_levels - 1]."""
    scale = torch.sqrt((rois[:, 2] - rois[:, 0]) * (rois[:, 3] - rois[:, 1]))
    levels = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return levels.clamp(min=0, max=num_levels - 1).long()


def multi_level_roi_align(
    feats: Sequence[Tensor],
    rois: Tensor,
    strides: Sequence[int],
    output_size: int = 7,
    finest_scale: float = 56.0,
) -> Tensor:
    """feats: L maps (B, C, h_l, w_l); rois: (R, 5) (batch index, x1, y1, x2, y2) pixels -> (R, C, S, S).
    RoIAlign is torchvision's (forward) with a vectorised CPU backward, see `aux/roi_align.py`."""
    if len(feats) != len(strides):
        raise ValueError(f"got {len(feats)} feature maps for {len(strides)} strides {tuple(strides)}")
    levels = map_roi_levels(rois[:, 1:], len(feats), finest_scale)
    out = feats[0].new_zeros((rois.shape[0], feats[0].shape[1], output_size, output_size))
    for lvl, (feat, stride) in enumerate(zip(feats, strides)):
        idx = (levels == lvl).nonzero().squeeze(1)
        if idx.numel() == rois.shape[0]:  # every RoI on this level (common at small input sizes): no scatter
            return roi_align(feat.to(rois.dtype), rois, output_size, 1.0 / stride, 0, True).to(out.dtype)
        if idx.numel() > 0:
            pooled = roi_align(feat.to(rois.dtype), rois[idx], output_size, 1.0 / stride, 0, True)
            out = out.index_put((idx,), pooled.to(out.dtype))
    return out


class Shared2FCBBoxHead(nn.Module):
    """forward(roi_feats (R, C, S, S)) -> (cls logits (R, nc + 1), deltas (R, 4 nc))."""

    def __init__(self, num_classes: int, in_channels: int = 256, roi_size: int = 7, fc_dim: int = 1024) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.shared_fcs = nn.ModuleList(
            [nn.Linear(in_channels * roi_size * roi_size, fc_dim), nn.Linear(fc_dim, fc_dim)]
        )
        self.fc_cls = nn.Linear(fc_dim, num_classes + 1)
        self.fc_reg = nn.Linear(fc_dim, 4 * num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mmdet init_cfg: Xavier-uniform on shared_fcs, Normal(0.01) on fc_cls, Normal(0.001) on fc_reg; bias 0."""
        for fc in self.shared_fcs.modules():
            if isinstance(fc, nn.Linear):
                nn.init.xavier_uniform_(fc.weight)
                nn.init.zeros_(fc.bias)
        nn.init.normal_(self.fc_cls.weight, 0.0, 0.01)
        nn.init.zeros_(self.fc_cls.bias)
        nn.init.normal_(self.fc_reg.weight, 0.0, 0.001)
        nn.init.zeros_(self.fc_reg.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(1)
        for fc in self.shared_fcs:
            x = F.relu(fc(x))
        return self.fc_cls(x), self.fc_reg(x)


class RoIHead(nn.Module):
    """forward_train(feats, proposals, gt_boxes, gt_labels) -> (losses, (coords, labels, targets, feats))."""

    def __init__(
        self,
        num_classes: int,
        assigner: MaxIoUAssigner,
        sampler: RandomSampler,
        in_channels: int = 256,
        strides: Sequence[int] = (4, 8, 16, 32, 64),
        output_size: int = 7,
        finest_scale: float = 56.0,
        fc_dim: int = 1024,
        coder_stds: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2),
        loss_index: int = 0,
        max_export: int = 2000,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.assigner = assigner
        self.sampler = sampler
        self.strides = tuple(int(s) for s in strides)
        self.output_size = output_size
        self.finest_scale = float(finest_scale)
        self.loss_index = loss_index  # suffix of the loss keys (authors' K order: RoI heads first)
        self.max_export = max_export
        self.coder = DeltaXYWHCoder(stds=coder_stds)
        self.bbox_head = Shared2FCBBoxHead(num_classes, in_channels, output_size, fc_dim)

    def forward_train(
        self,
        feats: Sequence[Tensor],
        proposals: Sequence[Tensor],
        gt_boxes: Sequence[Tensor],
        gt_labels: Sequence[Tensor],
    ) -> tuple[dict[str, Tensor], tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]]:
        """feats: the first L adapter maps (B, C, h_l, w_l); proposals: per image (P_i, 4) xyxy pixels (detached);
        gt_boxes: per image (G_i, 4) xyxy pixels; gt_labels: per image (G_i,) long.
        Returns the losses and, per image, the first M sampled RoIs: coords (M, 4), labels (M,) bg = nc,
        targets (M, 4) GT xyxy (zeros for negatives), pooled RoI features (M, C); see the module docstring."""
        rois, labels, targets, batch_ids = self.sample_rois(proposals, gt_boxes, gt_labels)
        counts = torch.bincount(batch_ids, minlength=len(proposals)).tolist()
        batch_idx = batch_ids.to(rois.dtype)[:, None]  # (R, 1)

        roi_feats = multi_level_roi_align(
            feats, torch.cat([batch_idx, rois], 1), self.strides, self.output_size, self.finest_scale
        )  # (R, C, S, S)
        cls_score, deltas = self.bbox_head(roi_feats)
        losses = self.loss(cls_score, deltas, rois, labels, targets, fed_class_mask(self.bbox_head, gt_labels))

        m = min([self.max_export, *counts])
        pooled = roi_feats.mean(-1).mean(-1)  # (R, C), the authors' order of the two means
        coords_out, labels_out, targets_out, feats_out = (
            [chunk[:m] for chunk in t.split(counts)] for t in (rois, labels, targets, pooled)
        )
        return losses, (coords_out, labels_out, targets_out, feats_out)

    @torch.no_grad()
    def sample_rois(
        self, proposals: Sequence[Tensor], gt_boxes: Sequence[Tensor], gt_labels: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Assignment and sampling for the whole batch (no per-image loop): proposals per image (P_i, 4), GT
        (G_i, 4) xyxy pixels and (G_i,) labels -> the sampled RoIs of every image, image after image, each image's
        [positives, negatives] in ascending prior index (GT rows first when added as proposals): rois (R, 4),
        labels (R,) bg = nc, targets (R, 4) assigned GT xyxy (zeros for negatives), image index (R,) long.
        The same assignment as per image (`MaxIoUAssigner.assign_batch`), sampling by `RandomSampler.sample_masks`."""
        nc = self.num_classes
        gt, gt_lab, gt_valid = pad_gts([g.float() for g in gt_boxes], gt_labels)  # (B, G, 4), (B, G), (B, G)
        props, _, prop_valid = pad_gts([p.detach().float() for p in proposals],
                                       [p.new_zeros(p.shape[0]) for p in proposals])  # (B, P, 4)  # fmt: skip
        res = self.assigner.assign_batch(props, gt, gt_lab, gt_valid, prop_valid)  # (B, P)
        priors, gt_inds, labels = props, res.gt_inds, res.labels
        if self.sampler.add_gt_as_proposals:  # GT rows first, assigned to themselves (mmdet `add_gt_`)
            own = torch.arange(1, gt.shape[1] + 1, device=gt.device)[None].expand(gt.shape[0], -1)
            priors = torch.cat([gt, props], 1)
            gt_inds = torch.cat([torch.where(gt_valid, own, -1), gt_inds], 1)
            labels = torch.cat([torch.where(gt_valid, gt_lab, -1), labels], 1)
        pos, neg = self.sampler.sample_masks(gt_inds)  # (B, S) each
        img_p, idx_p = pos.nonzero(as_tuple=True)  # row-major: image-major, ascending index
        img_n, idx_n = neg.nonzero(as_tuple=True)
        img = torch.cat([img_p, img_n])
        idx = torch.cat([idx_p, idx_n])
        is_neg = torch.cat([torch.zeros_like(img_p), torch.ones_like(img_n)])
        order = torch.sort(img * 2 + is_neg, stable=True).indices  # per image: positives, then negatives
        img, idx, is_neg = img[order], idx[order], is_neg[order].bool()
        assigned = gt[img, (gt_inds[img, idx] - 1).clamp(min=0)]  # (R, 4)
        roi_labels = torch.where(is_neg, nc, labels[img, idx])
        roi_targets = torch.where(is_neg[:, None], assigned.new_zeros(()), assigned)
        return priors[img, idx], roi_labels, roi_targets, img

    def loss(
        self, cls_score: Tensor, deltas: Tensor, rois: Tensor, labels: Tensor, targets: Tensor,
        class_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:  # fmt: skip
        """cls_score (R, nc + 1); deltas (R, 4 nc); rois (R, 4) xyxy; labels (R,) bg = nc; targets (R, 4) GT xyxy;
        class_mask (nc,): FedLoss selection, softmax over those classes + background (pipeline/models/fed_loss.py)."""
        nc, r, k = self.num_classes, labels.numel(), self.loss_index
        cls_score = cls_score.float()
        deltas = deltas.float()
        if class_mask is None:
            ce = F.cross_entropy(cls_score, labels, reduction="none")
        else:
            ce = fed_softmax_cross_entropy(cls_score, labels, class_mask)
        loss_cls = weight_reduce_loss(ce, avg_factor=max(r, 1))
        with torch.no_grad():
            correct = (cls_score.argmax(dim=1) == labels).float().sum()
            acc = correct * (100.0 / r) if r > 0 else cls_score.new_zeros(())  # mmdet `accuracy`
        pos = (labels < nc).nonzero().squeeze(1)
        if pos.numel() > 0:
            pos_deltas = deltas.view(r, nc, 4)[pos, labels[pos]]  # (P, 4), the delta of the GT class
            pred_boxes = self.coder.decode(rois[pos], pos_deltas)  # no clipping, as mmdet's loss
            loss_bbox = giou_loss(pred_boxes, targets[pos], avg_factor=r)
        else:
            loss_bbox = deltas[pos].sum()  # zero, keeps the graph (mmdet)
        return {
            f"loss_cls{k}": loss_cls,
            f"loss_bbox{k}": loss_bbox,
            f"acc{k}": acc,
        }
