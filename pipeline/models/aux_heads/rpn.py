"""Region proposal network of the Faster R-CNN auxiliary head (CO_DETR_SPEC.md 2.3, mmdet 3.x `RPNHead`).

Layers (authors' keys `rpn_head.*`): `rpn_conv` 3x3 + ReLU, `rpn_cls` 1x1 (A objectness logits, sigmoid),
`rpn_reg` 1x1 (4A deltas), A = 9 anchors per location; init N(0, 0.01), bias 0. The same layers run on every level.

Anchors: mmdet `AnchorGenerator` (centre offset 0), octave_base_scale 4, 3 scales per octave, ratios (0.5, 1, 2),
base size = stride; order (y, x, anchor), matching `permute(0, 2, 3, 1)` of the conv outputs.

Training targets (per image): anchors outside the image's own padded extent are ignored (mmdet `valid_flags` on
`pad_shape` = size rounded up to pad_size_divisor: 1 in the authors' configs (`Pad(size_divisor=1)`, and the mmdet 3
`DetDataPreprocessor` default); `allowed_border=-1`). MaxIoUAssigner(0.7, 0.3, min_pos 0.3, low-quality matches)
on the valid anchors, RandomSampler(256, 50% positives). Losses (mmdet `AnchorHead.loss_by_feat`, no all-reduce):
  loss_rpn_cls  = sum_sampled BCE(logit, is_pos) / N,   N = sum_b max(#pos_b, 1) + max(#neg_b, 1)
  loss_rpn_bbox = sum_pos |delta - encode(anchor, gt)|_1 / N      (coder means 0, stds 1)
mmdet sums per-level terms that share N; summing all anchors at once is the same up to float summation order.
Assignment and sampling run for the whole batch at once (`MaxIoUAssigner.assign_batch`, the same result as per image;
`RandomSampler.sample_masks`, the same quotas and distribution as mmdet's per-image randperm, other draws).

Proposals (mmdet `_predict_by_feat_single` + `_bbox_post_process`, train cfg `rpn_proposal`), per image, detached:
per level the `nms_pre` highest sigmoid scores (sort), decode + clip to the image size, drop boxes with width or
height <= min_bbox_size, NMS(0.7) separately per level (torchvision batched_nms with level ids), keep the
`max_per_img` best.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms

from pipeline.models.box_ops import DeltaXYWHCoder
from pipeline.models.losses import weight_reduce_loss
from pipeline.models.task_modules.anchors import anchor_scales, cached_grid_anchors, cached_valid_flags
from pipeline.models.task_modules.batching import pad_gts

if TYPE_CHECKING:
    from pipeline.models.task_modules.max_iou_assigner import MaxIoUAssigner
    from pipeline.models.task_modules.random_sampler import RandomSampler


class RPNHead(nn.Module):
    """forward(feats) -> (objectness, deltas); forward_train(feats, gt_boxes, img_sizes) -> (losses, proposals)."""

    def __init__(
        self,
        assigner: MaxIoUAssigner,
        sampler: RandomSampler,
        in_channels: int = 256,
        feat_channels: int = 256,
        strides: Sequence[int] = (4, 8, 16, 32, 64, 128),
        octave_base_scale: float = 4.0,
        scales_per_octave: int = 3,
        ratios: Sequence[float] = (0.5, 1.0, 2.0),
        nms_pre: int = 4000,
        nms_iou: float = 0.7,
        max_per_img: int = 1000,
        min_bbox_size: float = 0.0,
        pad_size_divisor: int = 1,
        loss_suffix: str = "",
    ) -> None:
        super().__init__()
        self.assigner = assigner
        self.sampler = sampler
        self.loss_suffix = loss_suffix  # "" = the authors' keys; the group index for a second Faster R-CNN head
        self.strides = tuple(int(s) for s in strides)
        self.scales = anchor_scales(None, octave_base_scale, scales_per_octave)
        self.ratios = tuple(float(r) for r in ratios)
        self.num_anchors = len(self.scales) * len(self.ratios)  # A
        self.nms_pre = nms_pre
        self.nms_iou = nms_iou
        self.max_per_img = max_per_img
        self.min_bbox_size = min_bbox_size
        self.pad_size_divisor = pad_size_divisor
        self.coder = DeltaXYWHCoder()  # means 0, stds 1

        self.rpn_conv = nn.Conv2d(in_channels, feat_channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(feat_channels, self.num_anchors, 1)
        self.rpn_reg = nn.Conv2d(feat_channels, 4 * self.num_anchors, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mmdet RPNHead init_cfg: Normal(std 0.01, bias 0) on every Conv2d."""
        for conv in (self.rpn_conv, self.rpn_cls, self.rpn_reg):
            nn.init.normal_(conv.weight, 0.0, 0.01)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    def forward(self, feats: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """feats: L maps (B, C, h_l, w_l) -> per level objectness (B, A, h_l, w_l), deltas (B, 4A, h_l, w_l)."""
        if len(feats) != len(self.strides):
            raise ValueError(f"RPNHead expects {len(self.strides)} maps (strides {self.strides}), got {len(feats)}")
        objectness, deltas = [], []
        for x in feats:
            x = F.relu(self.rpn_conv(x))
            objectness.append(self.rpn_cls(x))
            deltas.append(self.rpn_reg(x))
        return objectness, deltas

    def anchors(self, featmap_sizes: Sequence[tuple[int, int]], device: torch.device) -> list[Tensor]:
        """Per level (h_l * w_l * A, 4) xyxy pixels, order (y, x, anchor); memoised per size (do not modify)."""
        return cached_grid_anchors(featmap_sizes, self.strides, self.scales, self.ratios, device)

    def forward_train(
        self, feats: Sequence[Tensor], gt_boxes: Sequence[Tensor], img_sizes: Tensor
    ) -> tuple[dict[str, Tensor], list[Tensor]]:
        """gt_boxes: per image (G_i, 4) xyxy pixels; img_sizes (B, 2) (h, w) ->
        ({loss_rpn_cls, loss_rpn_bbox}, per image proposals (P_i, 4) xyxy, detached, P_i <= max_per_img)."""
        objectness, deltas = self(feats)
        sizes = [(int(o.shape[-2]), int(o.shape[-1])) for o in objectness]
        anchors = self.anchors(sizes, objectness[0].device)
        losses = self.loss(objectness, deltas, anchors, gt_boxes, img_sizes)
        return losses, self.proposals(objectness, deltas, anchors, img_sizes)

    def loss(
        self,
        objectness: Sequence[Tensor],
        deltas: Sequence[Tensor],
        anchors: Sequence[Tensor],
        gt_boxes: Sequence[Tensor],
        img_sizes: Tensor,
    ) -> dict[str, Tensor]:
        """Objectness BCE and delta L1 over the sampled anchors (see the module docstring)."""
        b = objectness[0].shape[0]
        sizes = [(int(o.shape[-2]), int(o.shape[-1])) for o in objectness]
        logits = torch.cat([o.permute(0, 2, 3, 1).reshape(b, -1) for o in objectness], 1).float()  # (B, N)
        pred = torch.cat([d.permute(0, 2, 3, 1).reshape(b, -1, 4) for d in deltas], 1).float()  # (B, N, 4)
        flat_anchors = torch.cat(list(anchors))  # (N, 4)

        valid = torch.stack([  # (B, N): the image's own padded extent (cached per size)
            torch.cat(cached_valid_flags(sizes, self.strides, self._pad_size(s), self.num_anchors, logits.device))
            for s in img_sizes
        ])  # fmt: skip
        gt, gt_labels, gt_valid = pad_gts([g.float() for g in gt_boxes], [g.new_zeros(g.shape[0]) for g in gt_boxes])
        result = self.assigner.assign_batch(flat_anchors, gt, gt_labels, gt_valid, valid)  # one foreground class
        pos, neg = self.sampler.sample_masks(result.gt_inds)  # (B, N) each
        chosen = pos | neg
        cls_sum = F.binary_cross_entropy_with_logits(logits[chosen], pos[chosen].to(logits.dtype), reduction="sum")
        assigned = gt.gather(1, (result.gt_inds - 1).clamp(min=0)[..., None].expand(-1, -1, 4))  # (B, N, 4)
        box_targets = self.coder.encode(flat_anchors[None].expand(b, -1, -1)[pos], assigned[pos])
        bbox_sum = (pred[pos] - box_targets).abs().sum()
        # mmdet's normaliser, summed over images; a device tensor (no host sync)
        avg_factor = (pos.sum(1).clamp(min=1) + neg.sum(1).clamp(min=1)).sum().to(torch.float32)
        return {
            f"loss_rpn_cls{self.loss_suffix}": weight_reduce_loss(cls_sum, avg_factor=avg_factor),
            f"loss_rpn_bbox{self.loss_suffix}": weight_reduce_loss(bbox_sum, avg_factor=avg_factor),
        }

    def _pad_size(self, img_size: Tensor) -> tuple[int, int]:
        """The image's own padded extent (mmdet `pad_shape`): size rounded up to pad_size_divisor."""
        h, w = (int(v) for v in img_size)
        d = self.pad_size_divisor
        if d <= 0:
            return (10**9, 10**9)  # every location of the batch maps is valid
        return (-(-h // d) * d, -(-w // d) * d)

    @torch.no_grad()
    def proposals(
        self, objectness: Sequence[Tensor], deltas: Sequence[Tensor], anchors: Sequence[Tensor], img_sizes: Tensor
    ) -> list[Tensor]:
        """Per image proposals (P_i, 4) xyxy pixels, clipped to img_sizes[i], best score first (see module doc)."""
        b = objectness[0].shape[0]
        level_scores, level_deltas, level_anchors, level_ids = [], [], [], []
        for lvl, (o, d, a) in enumerate(zip(objectness, deltas, anchors)):
            scores = o.detach().permute(0, 2, 3, 1).reshape(b, -1).float().sigmoid()  # (B, n)
            dl = d.detach().permute(0, 2, 3, 1).reshape(b, -1, 4).float()  # (B, n, 4)
            al = a[None].expand(b, -1, -1)  # (B, n, 4)
            if 0 < self.nms_pre < scores.shape[1]:
                scores, order = scores.sort(dim=1, descending=True)
                scores, order = scores[:, : self.nms_pre], order[:, : self.nms_pre]  # (B, k)
                dl = dl.gather(1, order[..., None].expand(-1, -1, 4))
                al = al.gather(1, order[..., None].expand(-1, -1, 4))
            level_scores.append(scores)
            level_deltas.append(dl)
            level_anchors.append(al)
            level_ids.append(torch.full_like(scores, lvl, dtype=torch.long))
        scores, dl, al, ids = (torch.cat(t, 1) for t in (level_scores, level_deltas, level_anchors, level_ids))

        out = []
        for i in range(b):
            h, w = (int(v) for v in img_sizes[i])
            boxes = self.coder.decode(al[i], dl[i], max_shape=(h, w))  # (K, 4), clipped to the image
            keep = ((boxes[:, 2:] - boxes[:, :2]) > self.min_bbox_size).all(dim=1)  # width and height
            boxes = boxes[keep]
            keep_idx = batched_nms(boxes, scores[i][keep], ids[i][keep], self.nms_iou)[: self.max_per_img]
            out.append(boxes[keep_idx])
        return out
