"""Contrastive denoising queries (DINO CDN, CO_DETR_SPEC.md 1.1 "Contrastive denoising").

Per batch: G = max(1, num_dn_queries // max_gt) groups (G = 1 without GT). Each group holds 2 * max_gt slots:
a positive half then a negative half, so that per image the layout is
[pos_g0 | neg_g0 | pos_g1 | neg_g1 | ...], every part `max_gt` long, pad_size = 2 * max_gt * G.
Image i fills the first n_i slots of every part; the remaining slots keep zero content and a zero box logit.
Noise: a label is resampled uniformly with probability label_noise / 2; box corners (normalised xyxy) move by
+-U[0,1) * (w/2, h/2) * box_noise for positives and +-(U[0,1) + 1) * (w/2, h/2) * box_noise for negatives,
then clamp to [0, 1]; box queries are inverse_sigmoid(cxcywh, eps=1e-3).
Attention mask (True = blocked): matching queries see no DN slot; DN groups do not see each other; DN slots
see the matching queries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipeline.models.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid


@dataclass
class DenoisingQueries:
    """query: (B, P, C) content; box_logits: (B, P, 4) inverse-sigmoid cxcywh; attn_mask: (P + Q, P + Q) bool;
    pad_size: P = 2 * max_gt * num_groups; num_groups: G; max_gt: largest GT count in the batch."""

    query: Tensor
    box_logits: Tensor
    attn_mask: Tensor
    pad_size: int
    num_groups: int
    max_gt: int

    def targets(self, targets: list[dict[str, Tensor]], num_classes: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-slot loss targets.

        Returns labels (B, P) long (bg = num_classes for negatives and pad slots), label_weights (B, P) ones,
        box_targets (B, P, 4) cxcywh normalised (GT on positive slots, 0 elsewhere), box_weights (B, P, 4)
        (1 on positive slots).
        """
        b, p = self.query.shape[:2]
        device = self.query.device
        labels = torch.full((b, p), num_classes, dtype=torch.long, device=device)
        box_targets = torch.zeros(b, p, 4, device=device)
        box_weights = torch.zeros(b, p, 4, device=device)
        for i, t in enumerate(targets):
            n = len(t["labels"])
            if n == 0:
                continue
            slots = self.positive_slots(n)
            labels[i, slots] = t["labels"].to(device).repeat(self.num_groups)
            box_targets[i, slots] = t["boxes"].to(device=device, dtype=box_targets.dtype).repeat(self.num_groups, 1)
            box_weights[i, slots] = 1.0
        return labels, torch.ones(b, p, device=device), box_targets, box_weights

    def positive_slots(self, n: int) -> Tensor:
        """Slot indices of the positive copies of an image's n GT boxes, group-major: (G * n,)."""
        device = self.query.device
        starts = torch.arange(self.num_groups, device=device) * 2 * self.max_gt
        return (starts[:, None] + torch.arange(n, device=device)[None]).flatten()


class CdnQueryGenerator(nn.Module):
    """Builds the denoising queries of a batch; owns the label embedding (nn.Embedding(nc, C), N(0, 1) init)."""

    def __init__(
        self,
        num_classes: int,
        embed_dims: int = 256,
        num_matching_queries: int = 900,
        label_noise: float = 0.5,
        box_noise: float = 1.0,
        num_dn_queries: int = 100,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embed_dims = embed_dims
        self.num_matching_queries = num_matching_queries
        self.label_noise = label_noise
        self.box_noise = box_noise
        self.num_dn_queries = num_dn_queries
        self.label_embedding = nn.Embedding(num_classes, embed_dims)

    def num_groups(self, max_gt: int) -> int:
        return max(1, self.num_dn_queries // max_gt) if max_gt > 0 else 1

    def forward(self, targets: list[dict[str, Tensor]]) -> DenoisingQueries:
        """targets: B dicts with `boxes (N_i, 4)` cxcywh normalised by the unpadded size and `labels (N_i,)`."""
        weight = self.label_embedding.weight
        device = weight.device
        counts = [len(t["labels"]) for t in targets]
        max_gt = max(counts, default=0)
        groups = self.num_groups(max_gt)
        pad = 2 * max_gt * groups
        b = len(targets)
        query = weight.new_zeros(b, pad, self.embed_dims)
        box_logits = weight.new_zeros(b, pad, 4)
        for i, t in enumerate(targets):
            n = counts[i]
            if n == 0:
                continue
            copies = 2 * groups
            labels = t["labels"].to(device).repeat(copies)  # (2G * n,), copy-major
            noisy = torch.rand(labels.shape, device=device) < self.label_noise * 0.5
            labels = torch.where(noisy, torch.randint_like(labels, 0, self.num_classes), labels)
            boxes = t["boxes"].to(device=device, dtype=weight.dtype)
            xyxy = box_cxcywh_to_xyxy(boxes).repeat(copies, 1)
            whwh = boxes[:, 2:].repeat(1, 2).repeat(copies, 1)
            negative = (torch.arange(copies, device=device).repeat_interleave(n) % 2 == 1)[:, None]
            sign = torch.randint(0, 2, xyxy.shape, device=device).to(xyxy.dtype) * 2.0 - 1.0
            part = (torch.rand_like(xyxy) + negative.to(xyxy.dtype)) * sign
            xyxy = (xyxy + part * whwh * self.box_noise / 2).clamp(min=0.0, max=1.0)
            slots = (torch.arange(copies, device=device)[:, None] * max_gt + torch.arange(n, device=device)).flatten()
            query[i, slots] = self.label_embedding(labels)
            box_logits[i, slots] = inverse_sigmoid(box_xyxy_to_cxcywh(xyxy), eps=1e-3)
        attn_mask = self.attention_mask(max_gt, groups, device)
        return DenoisingQueries(query, box_logits, attn_mask, pad, groups, max_gt)

    def attention_mask(self, max_gt: int, groups: int, device: torch.device) -> Tensor:
        """(P + Q, P + Q) bool, True = blocked. Built from a group id per row / column (DN slot s of group
        s // (2 * max_gt), -1 for the matching queries) by broadcasting: a handful of kernels, whatever G is.
        Column j is blocked for row i iff j is a DN slot of another group than i's (matching rows: every DN slot)."""
        pad = 2 * max_gt * groups
        total = pad + self.num_matching_queries
        idx = torch.arange(total, device=device)
        group = torch.where(idx < pad, idx // max(2 * max_gt, 1), -1)  # (P + Q,)
        return (group[None, :] >= 0) & (group[:, None] != group[None, :])
