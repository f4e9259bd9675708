"""Box conversions, aligned IoU and the DeltaXYWH box coder, with mmdetection's numerics.

Formats: `xyxy` = (x1, y1, x2, y2), `cxcywh` = (cx, cy, w, h). No `+1` anywhere (mmdet v2/v3 convention).
Pairwise IoU / GIoU come from torchvision (`box_iou`, `generalized_box_iou`, re-exported here); they give
the same float32 values as mmdet's `bbox_overlaps(is_aligned=False)` whenever the union is larger than its
eps, which holds for any ground-truth box of positive area. The aligned (row-by-row) IoU that the QFL target
and the GIoU loss need has no torchvision counterpart with mmdet's eps rule, so `aligned_iou` implements it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import box_convert, box_iou, generalized_box_iou

__all__ = [
    "DeltaXYWHCoder",
    "aligned_iou",
    "box_cxcywh_to_xyxy",
    "box_iou",
    "box_xyxy_to_cxcywh",
    "generalized_box_iou",
    "inverse_sigmoid",
]


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(..., 4) cxcywh -> (..., 4) xyxy: x1 = cx - 0.5 * w, x2 = cx + 0.5 * w (as mmdet)."""
    return box_convert(boxes, "cxcywh", "xyxy")


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """(..., 4) xyxy -> (..., 4) cxcywh: cx = (x1 + x2) / 2, w = x2 - x1 (as mmdet)."""
    return box_convert(boxes, "xyxy", "cxcywh")


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """log(x / (1 - x)) with x clamped to [0, 1] and both x and 1 - x clamped below at eps (mmdet)."""
    x = x.clamp(min=0, max=1)
    x1 = x.clamp(min=eps)
    x2 = (1 - x).clamp(min=eps)
    return torch.log(x1 / x2)


def aligned_iou(boxes1: Tensor, boxes2: Tensor, mode: str = "iou", eps: float = 1e-6) -> Tensor:
    """IoU or GIoU of boxes1[i] with boxes2[i], exactly mmdet's `bbox_overlaps(..., is_aligned=True)`.

    boxes1, boxes2: (..., 4) xyxy, same shape. Returns (...,).
    The union and the enclosing area are clamped below at `eps` (not `+ eps`), and the GIoU penalty uses the
    clamped union, as in mmdet.
    """
    if mode not in ("iou", "giou"):
        raise ValueError(f"aligned_iou mode must be 'iou' or 'giou', got {mode!r}")
    if boxes1.shape != boxes2.shape:
        raise ValueError(
            f"aligned_iou needs boxes of equal shape, got {tuple(boxes1.shape)} and {tuple(boxes2.shape)}"
        )
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    lt = torch.max(boxes1[..., :2], boxes2[..., :2])
    rb = torch.min(boxes1[..., 2:], boxes2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    eps_t = area1.new_tensor([eps])
    union = torch.max(area1 + area2 - overlap, eps_t)
    ious = overlap / union
    if mode == "iou":
        return ious
    enclose_wh = (
        torch.max(boxes1[..., 2:], boxes2[..., 2:]) - torch.min(boxes1[..., :2], boxes2[..., :2])
    ).clamp(min=0)
    enclose_area = torch.max(enclose_wh[..., 0] * enclose_wh[..., 1], eps_t)
    return ious - (enclose_area - union) / enclose_area


@dataclass(frozen=True)
class DeltaXYWHCoder:
    """mmdet v2 `DeltaXYWHBBoxCoder`: (dx, dy, dw, dh) of a box relative to an anchor, with means/stds.

    encode: dx = (gx - px) / pw, dw = log(gw / pw), then (d - means) / stds, where p/g are centres
    ((x1 + x2) * 0.5) and sizes (x2 - x1) of the anchor and the target.
    decode: d * stds + means; dw, dh clamped to +-|log(wh_ratio_clip)|; centre += anchor size * (dx, dy);
    size = anchor size * exp(dw, dh); optionally clipped to `max_shape` (h, w).
    """

    means: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # subtracted from the raw deltas
    stds: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)  # divide the raw deltas
    wh_ratio_clip: float = 16 / 1000  # |dw|, |dh| <= |log(wh_ratio_clip)| when decoding
    clip_border: bool = True  # clamp decoded boxes to max_shape when it is given
    add_ctr_clamp: bool = False  # clamp the centre shift to +-ctr_clamp pixels (mmdet option, off by default)
    ctr_clamp: float = 32.0  # centre-shift limit used only with add_ctr_clamp

    def encode(self, proposals: Tensor, gt: Tensor) -> Tensor:
        """proposals, gt: (..., 4) xyxy, same shape -> deltas (..., 4), float32."""
        if proposals.shape != gt.shape:
            raise ValueError(f"encode needs equal shapes, got {tuple(proposals.shape)} and {tuple(gt.shape)}")
        proposals = proposals.float()
        gt = gt.float()
        px = (proposals[..., 0] + proposals[..., 2]) * 0.5
        py = (proposals[..., 1] + proposals[..., 3]) * 0.5
        pw = proposals[..., 2] - proposals[..., 0]
        ph = proposals[..., 3] - proposals[..., 1]
        gx = (gt[..., 0] + gt[..., 2]) * 0.5
        gy = (gt[..., 1] + gt[..., 3]) * 0.5
        gw = gt[..., 2] - gt[..., 0]
        gh = gt[..., 3] - gt[..., 1]
        deltas = torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], dim=-1)
        means = deltas.new_tensor(self.means)
        stds = deltas.new_tensor(self.stds)
        return (deltas - means) / stds

    def decode(self, anchors: Tensor, deltas: Tensor, max_shape: Sequence[int] | None = None) -> Tensor:
        """anchors: (N, 4) xyxy; deltas: (N, 4 * k), k boxes per anchor (class-specific) -> (N, 4 * k) xyxy.

        max_shape: (h, w) of the image; when given (and clip_border), x is clamped to [0, w] and y to [0, h].
        Leading batch dims are accepted too: anchors (..., N, 4) with deltas (..., N, 4 * k).
        """
        if anchors.shape[-1] != 4 or deltas.shape[-1] % 4 != 0 or anchors.shape[:-1] != deltas.shape[:-1]:
            raise ValueError(
                f"decode needs anchors (..., N, 4) and deltas (..., N, 4k), got {tuple(anchors.shape)} "
                f"and {tuple(deltas.shape)}"
            )
        out_shape = deltas.shape
        if deltas.numel() == 0:
            return deltas.clone()
        k = deltas.shape[-1] // 4
        d = deltas.reshape(-1, 4)  # (M * k, 4), M = number of anchors
        d = d * d.new_tensor(self.stds).view(1, -1) + d.new_tensor(self.means).view(1, -1)
        dxy, dwh = d[:, :2], d[:, 2:]
        rois = anchors.reshape(-1, 4).repeat(1, k).reshape(-1, 4)  # (M * k, 4)
        pxy = (rois[:, :2] + rois[:, 2:]) * 0.5
        pwh = rois[:, 2:] - rois[:, :2]
        dxy_wh = pwh * dxy
        max_ratio = abs(math.log(self.wh_ratio_clip))
        if self.add_ctr_clamp:
            dxy_wh = torch.clamp(dxy_wh, max=self.ctr_clamp, min=-self.ctr_clamp)
            dwh = torch.clamp(dwh, max=max_ratio)
        else:
            dwh = dwh.clamp(min=-max_ratio, max=max_ratio)
        gxy = pxy + dxy_wh
        gwh = pwh * dwh.exp()
        boxes = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1)
        if self.clip_border and max_shape is not None:
            h, w = float(max_shape[0]), float(max_shape[1])
            boxes = torch.stack(
                [
                    boxes[:, 0].clamp(0, w),
                    boxes[:, 1].clamp(0, h),
                    boxes[:, 2].clamp(0, w),
                    boxes[:, 3].clamp(0, h),
                ],
                dim=-1,
            )
        return boxes.reshape(out_shape)
