"""Hungarian one-to-one matcher of Co-DINO / DINO (mmdet `HungarianAssigner` with its three costs) [spec 4.1].

cost[q, g] = FocalLossCost(weight 2) + BBoxL1Cost(weight 5, normalised cxcywh) + IoUCost(-GIoU, weight 2,
pixel xyxy), summed in that order, then scipy's `linear_sum_assignment` on the float32 cost on the host.

One host sync per training step (`match_many`): the costs of every matching problem of the step (all decoder
layers, the encoder proposals), every image and layer, are computed on the device in one batched pass per problem
(ground truth padded to the batch's largest count), copied to the host in ONE `.cpu()` of their concatenation,
solved by scipy in a thread pool (one task per layer x image), and the assignments go back in one host->device copy.

Difference from the mmdet 3.x port, on purpose: mmdet 3.x converts the predicted boxes to pixel xyxy and back
before the L1 cost; we use the normalised cxcywh directly (the authors' mmdet 2.x path). The costs differ by
float rounding only (~1e-7), which can change the assignment only on exact near-ties. Costs are computed in
float32 whatever the autocast dtype of the predictions.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from pipeline.models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

__all__ = ["HungarianMatcher", "MatchProblem", "Matches", "focal_loss_cost"]

_MAX_THREADS = 8


def focal_loss_cost(
    logits: Tensor, gt_labels: Tensor, alpha: float = 0.25, gamma: float = 2.0, eps: float = 1e-12
) -> Tensor:
    """mmdet `FocalLossCost` (unweighted). logits: (..., Q, nc); gt_labels: (N,) or (..., N) (same leading dims as
    logits, or broadcastable to them) -> (..., Q, N).

    p = sigmoid(logits); neg = -log(1 - p + eps) * (1 - alpha) * p^gamma;
    pos = -log(p + eps) * alpha * (1 - p)^gamma; cost = pos[..., gt] - neg[..., gt].
    """
    p = logits.sigmoid()
    neg = -(1 - p + eps).log() * (1 - alpha) * p.pow(gamma)
    pos = -(p + eps).log() * alpha * (1 - p).pow(gamma)
    if gt_labels.dim() == 1:
        return pos[..., gt_labels] - neg[..., gt_labels]
    q = logits.shape[-2]
    lead = torch.broadcast_shapes(logits.shape[:-2], gt_labels.shape[:-1])
    index = gt_labels.unsqueeze(-2).expand(*lead, q, gt_labels.shape[-1])  # (..., Q, N)
    return pos.expand(*lead, *pos.shape[-2:]).gather(-1, index) - neg.expand(*lead, *neg.shape[-2:]).gather(-1, index)


@dataclass(frozen=True)
class MatchProblem:
    """One set of predictions of a batch to match against its ground truth.

    logits: (L, B, Q, nc) and boxes: (L, B, Q, 4) sigmoid cxcywh normalised, L stacked prediction sets (decoder
    layers; 1 for the encoder proposals), detached; gt_labels: B tensors (N_i,) long (the classes this problem
    matches against, e.g. all 0 for class-agnostic proposals)."""

    logits: Tensor
    boxes: Tensor
    gt_labels: Sequence[Tensor]


@dataclass(frozen=True)
class Matches:
    """The positives of one MatchProblem, on the predictions' device, each (T,) long: prediction set `layer`,
    `image`, `query` matched to ground-truth `gt` (index into the batch's GT concatenated image after image).
    Within one (layer, image) the pairs are sorted by query index (the order in which mmdet lists positives)."""

    layer: Tensor
    image: Tensor
    query: Tensor
    gt: Tensor


def _solve(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return linear_sum_assignment(cost)


class HungarianMatcher:
    """One-to-one assignment of Q predictions to N ground-truth boxes per image (no gradients)."""

    def __init__(
        self,
        cls_cost: float = 2.0,
        l1_cost: float = 5.0,
        giou_cost: float = 2.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
        eps: float = 1e-12,
    ) -> None:
        self.cls_cost = cls_cost
        self.l1_cost = l1_cost
        self.giou_cost = giou_cost
        self.alpha = alpha
        self.gamma = gamma
        self.eps = eps

    def __repr__(self) -> str:
        return (
            f"HungarianMatcher(cls_cost={self.cls_cost}, l1_cost={self.l1_cost}, giou_cost={self.giou_cost}, "
            f"alpha={self.alpha}, gamma={self.gamma})"
        )

    @torch.no_grad()
    def cost_matrix(
        self,
        logits: Tensor,
        boxes: Tensor,
        gt_labels: Tensor,
        gt_boxes: Tensor,
        img_size: Sequence[int] | Tensor,
    ) -> Tensor:
        """(..., Q, N) float32 cost. logits: (..., Q, nc); boxes: (..., Q, 4) cxcywh normalised; gt_labels: (N,) or
        (..., N); gt_boxes: (N, 4) or (..., N, 4) cxcywh normalised; img_size: (h, w) or (..., 2) of the unpadded
        network input, broadcast against the leading dims (e.g. (1, B, 1, 2) for logits (L, B, Q, nc))."""
        logits, boxes, gt_boxes = logits.float(), boxes.float(), gt_boxes.float()
        hw = torch.as_tensor(img_size, dtype=torch.float32, device=boxes.device)
        factor = torch.stack([hw[..., 1], hw[..., 0], hw[..., 1], hw[..., 0]], -1).unsqueeze(-2)  # (..., 1, 4) w,h,w,h
        cls = focal_loss_cost(logits, gt_labels, self.alpha, self.gamma, self.eps) * self.cls_cost
        lead = torch.broadcast_shapes(boxes.shape[:-2], gt_boxes.shape[:-2])
        l1 = torch.cdist(boxes.expand(*lead, *boxes.shape[-2:]), gt_boxes.expand(*lead, *gt_boxes.shape[-2:]), p=1)
        giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes) * factor, box_cxcywh_to_xyxy(gt_boxes) * factor)
        return cls + l1 * self.l1_cost + giou * self.giou_cost

    @torch.no_grad()
    def match(
        self,
        logits: Tensor,
        boxes: Tensor,
        gt_labels: Tensor,
        gt_boxes: Tensor,
        img_size: Sequence[int] | Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Optimal assignment of one image. logits: (Q, nc); boxes: (Q, 4); gt_labels: (N,); gt_boxes: (N, 4).

        Returns (query_idx (K,), gt_idx (K,)) long on logits' device, K = min(Q, N), sorted by query index
        (the order in which mmdet lists positives). N = 0 or Q = 0 gives two empty tensors.
        """
        if boxes.shape[-1] != 4 or gt_boxes.shape[-1] != 4 or logits.shape[0] != boxes.shape[0]:
            raise ValueError(
                f"match needs logits (Q, nc), boxes (Q, 4), gt_boxes (N, 4); got {tuple(logits.shape)}, "
                f"{tuple(boxes.shape)}, {tuple(gt_boxes.shape)}"
            )
        sizes = torch.as_tensor(img_size, device=logits.device).reshape(1, 2)
        problem = MatchProblem(logits[None, None], boxes[None, None], [gt_labels])
        (m,) = self.match_many([problem], [gt_boxes], sizes)
        return m.query, m.gt

    @torch.no_grad()
    def match_many(
        self, problems: Sequence[MatchProblem], gt_boxes: Sequence[Tensor], img_sizes: Tensor
    ) -> list[Matches]:
        """Optimal assignment of every (problem, layer, image): one device->host copy, one host->device copy.

        gt_boxes: B tensors (N_i, 4) cxcywh normalised; img_sizes: (B, 2) (h, w) of the unpadded network input.
        Raises ValueError if a cost is NaN / inf (non-finite logits or boxes)."""
        counts = [int(g.shape[0]) for g in gt_boxes]
        b, n_max = len(counts), max(counts, default=0)
        device = problems[0].boxes.device if problems else img_sizes.device
        for p in problems:
            if p.logits.dim() != 4 or p.boxes.shape != (*p.logits.shape[:3], 4) or p.logits.shape[1] != b:
                raise ValueError(
                    f"match_many needs logits (L, {b}, Q, nc) and boxes (L, {b}, Q, 4); got "
                    f"{tuple(p.logits.shape)} and {tuple(p.boxes.shape)}"
                )
        costs: list[Tensor] = []
        if n_max > 0:
            pad = torch.tensor([0.5, 0.5, 1.0, 1.0], device=device)  # a valid box in the padded GT columns
            boxes_pad = torch.stack(
                [torch.cat([g.to(device).float(), pad.expand(n_max - len(g), 4)]) for g in gt_boxes]
            )  # (B, n_max, 4)
            sizes = img_sizes.to(device).reshape(1, b, 2)
            for p in problems:
                if p.logits.shape[2] == 0:
                    continue
                fill = torch.zeros(n_max, dtype=torch.long, device=device)
                labels = torch.stack([torch.cat([lab.to(device).long(), fill[len(lab) :]]) for lab in p.gt_labels])
                cost = self.cost_matrix(p.logits, p.boxes, labels[None], boxes_pad[None], sizes)  # (L, B, Q, n_max)
                costs.append(cost.reshape(-1))
        host = torch.cat(costs).cpu().numpy() if costs else np.zeros(0, np.float32)  # the one device->host copy
        if not np.isfinite(host).all():
            raise ValueError("HungarianMatcher: the cost matrix has NaN/inf entries (non-finite logits or boxes?)")

        tasks: list[tuple[int, int, int, np.ndarray]] = []  # (problem, layer, image, cost (Q, N_i))
        offset = 0
        for j, p in enumerate(problems):
            n_layers, _, q = p.logits.shape[:3]
            if q == 0 or n_max == 0:
                continue
            block = host[offset : offset + n_layers * b * q * n_max].reshape(n_layers, b, q, n_max)
            offset += block.size
            tasks += [(j, l, i, block[l, i, :, : counts[i]]) for l in range(n_layers) for i in range(b) if counts[i]]
        workers = min(len(tasks), os.cpu_count() or 1, _MAX_THREADS)
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                solved = list(pool.map(_solve, [t[3] for t in tasks]))
        else:
            solved = [_solve(t[3]) for t in tasks]

        gt_start = np.cumsum([0, *counts])
        per_problem: list[list[np.ndarray]] = [[] for _ in problems]
        for (j, l, i, _), (rows, cols) in zip(tasks, solved):
            k = len(rows)
            per_problem[j].append(np.stack([np.full(k, l), np.full(k, i), rows, cols + gt_start[i]]))
        blocks = [np.concatenate(x, axis=1) if x else np.zeros((4, 0), np.int64) for x in per_problem]
        lengths = [blk.shape[1] for blk in blocks]
        flat = np.concatenate(blocks, axis=1).astype(np.int64) if blocks else np.zeros((4, 0), np.int64)
        index = torch.from_numpy(flat).to(device)  # the one host->device copy
        return [Matches(*part.unbind(0)) for part in index.split(lengths, dim=1)]
