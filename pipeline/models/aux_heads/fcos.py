"""FCOS auxiliary head (paper Tables 1, 8; Tian et al. 2019 with mmdet `FCOSHead` and its improvements: centre
sampling, norm_on_bbox, centerness on the regression branch, GIoU).

Architecture (mmdet key names): `stacked_convs` (1, as the authors' aux ATSS) 3x3 conv (no bias) + GN(32) + ReLU
per tower (`cls_convs.i.conv/gn`, `reg_convs.i.conv/gn`), 3x3 `conv_cls` (nc, sigmoid, bias prior 0.01),
`conv_reg` (4 distances l, t, r, b), `conv_centerness` (1, on the regression tower), a learnable `Scale` per level
(`scales.l.scale`); distances = ReLU(scale * conv_reg) in units of the level's stride. Init N(0, 0.01).

Points: one per location, (x s + s // 2, y s + s // 2) (mmdet). Targets per image (`FCOSAssigner`): a point is
positive for a GT if it lies inside the GT's centre region (the box of half-size radius x stride = 1.5 s around the
GT centre, clipped to the GT) and its largest distance to the GT's sides lies in its level's regression range
(`fcos_regress_ranges`: ((-1, 64), (64, 128), (128, 256), (256, 512), (512, inf)) for strides 8..128, (-1, 32) in
front for a stride-4 level); among several GTs the smallest-area one wins (first on ties).
Losses (mmdet `FCOSHead.loss_by_feat`), unweighted (table base weights: cls 1, bbox 1, centerness 1, x lambda2 x 6):
  loss_cls{k}        = sum focal(cls, onehot) / P,       P = max(reduce_mean(#pos), 1)
  loss_bbox{k}       = sum_pos c (1 - GIoU(decode(point, pred), decode(point, target))) / max(reduce_mean(sum c), 1e-6)
  loss_centerness{k} = sum_pos BCE(centerness logit, c) / P,   c = centerness target of the positive point

Export (paper Table 1): the FCOS points as boxes of side 8 x stride centred on the point (the size of an aux ATSS
anchor), labels (bg = nc), assigned GT xyxy (zeros for negatives), feats = with_coord_feat: the adapter feature at
the point (N, C).
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
from pipeline.models.aux_heads.table import AuxBuildContext, FCOSConfig
from pipeline.models.losses import giou_loss, reduce_mean, sigmoid_focal_loss
from pipeline.models.task_modules.batching import pad_gts

_INF = 1e8


def fcos_regress_ranges(strides: Sequence[int]) -> tuple[tuple[float, float], ...]:
    """Per-level (lower, upper) of the largest regression distance: upper 8 x stride, the previous upper below;
    the first from -1, the last to infinity (strides 8..128: the original FCOS ranges)."""
    uppers = [8.0 * s for s in strides[:-1]] + [_INF]
    return tuple(zip([-1.0] + uppers[:-1], uppers))


def fcos_points(sizes: Sequence[tuple[int, int]], strides: Sequence[int], device: torch.device) -> list[Tensor]:
    """Per level (h w, 2) point (x, y) pixels, row-major: (x s + s // 2, y s + s // 2)."""
    out = []
    for (h, w), s in zip(sizes, strides):
        ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        out.append(torch.stack([xs.reshape(-1), ys.reshape(-1)], 1).float() * s + s // 2)
    return out


class FCOSAssigner:
    """assign(points (N, 2), point_strides (N,), ranges (N, 2), gt (G, 4) xyxy, labels (G,), num_classes) ->
    (labels (N,) bg = num_classes, gt index (N,) -1 = none); see the module docstring."""

    def __init__(self, radius: float = 1.5, center_sampling: bool = True) -> None:
        self.radius = radius
        self.center_sampling = center_sampling

    @torch.no_grad()
    def assign(
        self, points: Tensor, point_strides: Tensor, ranges: Tensor, gt: Tensor, gt_labels: Tensor, num_classes: int
    ) -> tuple[Tensor, Tensor]:
        n, g = points.shape[0], gt.shape[0]
        if g == 0:
            return points.new_full((n,), num_classes, dtype=torch.long), points.new_full((n,), -1, dtype=torch.long)
        x, y = points[:, 0:1], points[:, 1:2]  # (N, 1)
        ltrb = torch.stack([x - gt[:, 0], y - gt[:, 1], gt[:, 2] - x, gt[:, 3] - y], -1)  # (N, G, 4)
        if self.center_sampling:
            cx, cy = (gt[:, 0] + gt[:, 2]) / 2, (gt[:, 1] + gt[:, 3]) / 2  # (G,)
            r = point_strides[:, None] * self.radius  # (N, 1)
            x0, y0 = torch.maximum(cx - r, gt[:, 0]), torch.maximum(cy - r, gt[:, 1])
            x1, y1 = torch.minimum(cx + r, gt[:, 2]), torch.minimum(cy + r, gt[:, 3])
            inside = torch.stack([x - x0, y - y0, x1 - x, y1 - y], -1).min(-1).values > 0
        else:
            inside = ltrb.min(-1).values > 0
        largest = ltrb.max(-1).values  # (N, G)
        in_range = (largest >= ranges[:, 0:1]) & (largest <= ranges[:, 1:2])
        areas = ((gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1]))[None].expand(n, g).clone()
        areas[~(inside & in_range)] = _INF
        min_area, idx = areas.min(1)
        labels = gt_labels[idx].long()
        labels[min_area == _INF] = num_classes
        idx[min_area == _INF] = -1
        return labels, idx

    @torch.no_grad()
    def assign_batch(
        self, points: Tensor, point_strides: Tensor, ranges: Tensor, gt: Tensor, gt_labels: Tensor, gt_valid: Tensor,
        num_classes: int,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        """`assign` for every image at once: GT padded (B, G, 4), (B, G), valid (B, G) -> labels (B, N),
        gt index (B, N) (-1 = none); equal to `assign` per image (elementwise, exact minima)."""
        b, n = gt.shape[0], points.shape[0]
        x, y = points[None, :, 0:1], points[None, :, 1:2]  # (1, N, 1)
        g = gt[:, None]  # (B, 1, G, 4)
        ltrb = torch.stack([x - g[..., 0], y - g[..., 1], g[..., 2] - x, g[..., 3] - y], -1)  # (B, N, G, 4)
        if self.center_sampling:
            cx, cy = (g[..., 0] + g[..., 2]) / 2, (g[..., 1] + g[..., 3]) / 2  # (B, 1, G)
            r = point_strides[None, :, None] * self.radius  # (1, N, 1)
            x0, y0 = torch.maximum(cx - r, g[..., 0]), torch.maximum(cy - r, g[..., 1])
            x1, y1 = torch.minimum(cx + r, g[..., 2]), torch.minimum(cy + r, g[..., 3])
            inside = torch.stack([x - x0, y - y0, x1 - x, y1 - y], -1).min(-1).values > 0
        else:
            inside = ltrb.min(-1).values > 0
        largest = ltrb.max(-1).values  # (B, N, G)
        in_range = (largest >= ranges[None, :, 0:1]) & (largest <= ranges[None, :, 1:2])
        areas = ((g[..., 2] - g[..., 0]) * (g[..., 3] - g[..., 1])).expand(b, n, -1)
        areas = torch.where(inside & in_range & gt_valid[:, None, :], areas, areas.new_tensor(_INF))
        min_area, idx = areas.min(2)  # first GT on ties, padded GTs last
        none = min_area == _INF
        labels = torch.where(none, num_classes, gt_labels.gather(1, idx).long())
        return labels, torch.where(none, -1, idx)


def _distances_to_boxes(points: Tensor, d: Tensor) -> Tensor:
    return torch.cat([points - d[:, :2], points + d[:, 2:]], 1)


class FCOSHead(AuxHead):
    """forward(feats) -> per level cls (B, nc, h, w), distances (B, 4, h, w) in stride units, centerness (B, 1, h, w);
    forward_train(feats, targets, img_sizes) -> (unweighted losses, AuxPositives)."""

    name = "fcos"

    def __init__(
        self,
        num_classes: int = 80,
        in_channels: int = 256,
        feat_channels: int = 256,
        cfg: FCOSConfig | None = None,
        strides: Sequence[int] = (4, 8, 16, 32, 64, 128),
        loss_index: int = 0,
        with_coord_feat: bool = False,
    ) -> None:
        super().__init__()
        cfg = cfg if cfg is not None else FCOSConfig()
        self.num_classes = num_classes
        self.strides = tuple(int(s) for s in strides)
        self.regress_ranges = tuple(cfg.regress_ranges) or fcos_regress_ranges(self.strides)
        if len(self.regress_ranges) != len(self.strides):
            raise ValueError(f"FCOS regress_ranges {self.regress_ranges} do not fit strides {self.strides}")
        self.loss_index = loss_index
        self.with_coord_feat = with_coord_feat
        self.export_scale = cfg.export_scale
        self.focal_alpha, self.focal_gamma = cfg.focal_alpha, cfg.focal_gamma
        self.assigner = FCOSAssigner(cfg.center_sample_radius, cfg.center_sampling)
        chans = [in_channels] + [feat_channels] * cfg.stacked_convs
        self.cls_convs = conv_tower(ConvGNReLU, in_channels, feat_channels, cfg.stacked_convs)
        self.reg_convs = conv_tower(ConvGNReLU, in_channels, feat_channels, cfg.stacked_convs)
        self.conv_cls = nn.Conv2d(chans[-1], num_classes, 3, padding=1)
        self.conv_reg = nn.Conv2d(chans[-1], 4, 3, padding=1)
        self.conv_centerness = nn.Conv2d(chans[-1], 1, 3, padding=1)
        self.scales = nn.ModuleList([Scale(1.0) for _ in self.strides])
        init_dense_head(self, self.conv_cls, cfg.prior_prob)

    def forward(self, feats: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        check_levels(self, feats, self.strides)
        cls_scores, dists, ctrs = [], [], []
        for x, scale in zip(feats, self.scales):
            c, r = self.cls_convs(x), self.reg_convs(x)
            cls_scores.append(self.conv_cls(c))
            dists.append(F.relu(scale(self.conv_reg(r)).float()))  # norm_on_bbox: stride units
            ctrs.append(self.conv_centerness(r))
        return cls_scores, dists, ctrs

    def forward_train(
        self, feats: list[Tensor], targets: list[dict[str, Tensor]], img_sizes: Tensor
    ) -> tuple[dict[str, Tensor], AuxPositives]:
        cls_scores, dists, ctrs = self(feats)
        b, nc, device = cls_scores[0].shape[0], self.num_classes, cls_scores[0].device
        sizes = [(int(m.shape[-2]), int(m.shape[-1])) for m in cls_scores]
        level_points = fcos_points(sizes, self.strides, device)
        points = torch.cat(level_points)  # (N, 2)
        point_strides = torch.cat([p.new_full((p.shape[0],), float(s)) for p, s in zip(level_points, self.strides)])
        ranges = torch.cat([p.new_tensor(r).expand(p.shape[0], 2) for p, r in zip(level_points, self.regress_ranges)])
        gt_boxes, gt_labels = gt_to_pixels(targets, img_sizes, device)
        gt_pad, lab_pad, gt_valid = pad_gts(gt_boxes, gt_labels)  # one batched assignment
        labels_t, idx = self.assigner.assign_batch(points, point_strides, ranges, gt_pad, lab_pad, gt_valid, nc)
        assigned_t = gt_pad.gather(1, idx.clamp(min=0)[..., None].expand(-1, -1, 4))
        assigned_t = torch.where((idx >= 0)[..., None], assigned_t, assigned_t.new_zeros(()))  # (B, N, 4)

        cls = flatten_levels(cls_scores, nc).float()  # (B, N, nc)
        dist = flatten_levels(dists, 4)  # (B, N, 4)
        ctr = flatten_levels(ctrs, 1).squeeze(-1).float()  # (B, N)
        pos = labels_t < nc
        num_pos = reduce_mean(pos.sum().to(torch.float32)).clamp(min=1.0)  # a device tensor: no host sync
        loss_cls = sigmoid_focal_loss(cls.reshape(-1, nc), labels_t.reshape(-1), None, num_pos,
                                      self.focal_alpha, self.focal_gamma)  # fmt: skip
        if pos.any():
            p_pts = points[None].expand(b, -1, -1)[pos]
            p_strides = point_strides[None].expand(b, -1)[pos][:, None]
            gt = assigned_t[pos]
            t_dist = torch.cat([p_pts - gt[:, :2], gt[:, 2:] - p_pts], 1) / p_strides  # (P, 4) stride units
            lr, tb = t_dist[:, [0, 2]], t_dist[:, [1, 3]]
            c_t = torch.sqrt((lr.min(-1).values / lr.max(-1).values) * (tb.min(-1).values / tb.max(-1).values))
            denorm = reduce_mean(c_t.sum().detach()).clamp(min=1e-6)
            p_unit = p_pts / p_strides  # decode both in stride units (GIoU is scale-invariant)
            loss_bbox = giou_loss(_distances_to_boxes(p_unit, dist[pos]), _distances_to_boxes(p_unit, t_dist),
                                  weight=c_t, avg_factor=denorm)  # fmt: skip
            loss_ctr = F.binary_cross_entropy_with_logits(ctr[pos], c_t, reduction="sum") / num_pos
        else:
            loss_bbox, loss_ctr = dist.sum() * 0, ctr.sum() * 0
        half = point_strides[:, None] * self.export_scale / 2
        boxes = torch.cat([points - half, points + half], 1)  # (N, 4) export boxes, side export_scale x stride
        feats_out = None
        if self.with_coord_feat:
            feats_out = list(flatten_levels(feats, feats[0].shape[1]).unbind(0))
        positives = AuxPositives(head=self.name, coords=[boxes] * b, labels=list(labels_t.unbind(0)),
                                 targets=list(assigned_t.unbind(0)), feats=feats_out)  # fmt: skip
        k = self.loss_index
        return {f"loss_cls{k}": loss_cls, f"loss_bbox{k}": loss_bbox, f"loss_centerness{k}": loss_ctr}, positives


def build(cfg: FCOSConfig, ctx: AuxBuildContext) -> FCOSHead:
    """The table's builder (pipeline/models/aux_heads/table.py)."""
    return FCOSHead(ctx.num_classes, ctx.embed_dims, ctx.embed_dims, cfg, ctx.strides_of(cfg.strides),
                    ctx.loss_index, ctx.with_coord_feat)  # fmt: skip
