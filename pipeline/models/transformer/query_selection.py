"""Two-stage proposal generation and DINO query selection (CO_DETR_SPEC.md 1.1 Two-stage, mixed selection)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.models.layers.deform_attn import SpatialHW, level_hw


def encoder_proposals(
    memory: Tensor,
    padding_mask: Tensor,
    spatial_shapes: Tensor | SpatialHW,
    base_wh: float = 0.05,
    valid_min: float = 0.01,
    valid_max: float = 0.99,
) -> tuple[Tensor, Tensor]:
    """One anchor per memory token (mmdet `gen_encoder_output_proposals`, without the output projection).

    memory: (B, S, C); padding_mask: (B, S) True = pad; spatial_shapes: (L, 2) long (h, w), or the same as
    Python ints (no host sync).
    Anchor of level l: centre (pixel + 0.5) / valid size, w = h = base_wh * 2**l, stored as logits; padded or
    invalid anchors (a coordinate outside (valid_min, valid_max)) get +inf and their memory is zeroed.
    Returns (memory with invalid tokens zeroed (B, S, C), anchor logits (B, S, 4) cxcywh).
    """
    n = memory.shape[0]
    proposals = []
    start = 0
    for lvl, (h, w) in enumerate(level_hw(spatial_shapes)):
        mask = padding_mask[:, start : start + h * w].view(n, h, w)
        valid_h = torch.sum(~mask[:, :, 0], 1)
        valid_w = torch.sum(~mask[:, 0, :], 1)
        grid_y, grid_x = torch.meshgrid(  # == the authors' linspace(0, h - 1, h), exportable with a dynamic size
            torch.arange(h, dtype=torch.float32, device=memory.device),
            torch.arange(w, dtype=torch.float32, device=memory.device),
            indexing="ij",
        )
        grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)  # (h, w, 2)
        scale = torch.cat([valid_w.unsqueeze(-1), valid_h.unsqueeze(-1)], 1).view(n, 1, 1, 2)
        grid = (grid.unsqueeze(0).expand(n, -1, -1, -1) + 0.5) / scale
        wh = torch.ones_like(grid) * base_wh * (2.0**lvl)
        proposals.append(torch.cat((grid, wh), -1).view(n, -1, 4))
        start += h * w
    proposals_t = torch.cat(proposals, 1)
    valid = ((proposals_t > valid_min) & (proposals_t < valid_max)).all(-1, keepdim=True)
    proposals_t = torch.log(proposals_t / (1 - proposals_t))
    proposals_t = proposals_t.masked_fill(padding_mask.unsqueeze(-1), float("inf"))
    proposals_t = proposals_t.masked_fill(~valid, float("inf"))
    memory = memory.masked_fill(padding_mask.unsqueeze(-1), 0.0).masked_fill(~valid, 0.0)
    return memory, proposals_t


@dataclass
class QuerySelection:
    """Top-k encoder proposals.

    logits: (B, K, nc) class logits of the selected tokens (encoder loss input).
    boxes: (B, K, 4) sigmoid cxcywh, not detached (encoder loss input).
    ref_logits: (B, K, 4) box logits, detached: the initial decoder references (after sigmoid).
    indices: (B, K) long, token index into the flattened memory.
    """

    logits: Tensor
    boxes: Tensor
    ref_logits: Tensor
    indices: Tensor


def select_topk(enc_logits: Tensor, enc_box_logits: Tensor, k: int) -> QuerySelection:
    """DINO selection: top-k tokens by their max class logit.

    enc_logits: (B, S, nc); enc_box_logits: (B, S, 4) = reg(output_memory) + anchor logits.
    """
    if k > enc_logits.shape[1]:
        raise ValueError(f"cannot select {k} queries from {enc_logits.shape[1]} encoder tokens; lower num_queries")
    indices = torch.topk(enc_logits.max(-1)[0], k, dim=1)[1]
    logits = torch.gather(enc_logits, 1, indices.unsqueeze(-1).expand(-1, -1, enc_logits.shape[-1]))
    box_logits = torch.gather(enc_box_logits, 1, indices.unsqueeze(-1).expand(-1, -1, 4))
    return QuerySelection(logits, box_logits.sigmoid(), box_logits.detach(), indices)
