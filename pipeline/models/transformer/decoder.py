"""DINO decoder with iterative box refinement and look-forward-twice (CO_DETR_SPEC.md 1.1 Decoder).

Layer (post-norm): self-attn (q = k = x + pos, v = x) -> LN -> MSDeformAttn cross-attn on the encoder memory
-> LN -> FFN -> LN. Per layer the positional query is `ref_point_head(sine(ref * valid_ratios))`.
After layer l: new_ref = sigmoid(reg_branches[l](out_l) + inverse_sigmoid(ref, 1e-3)) using the output *before*
the shared final `norm`; the next layer gets new_ref.detach(), while the returned references keep the
non-detached new_ref (look-forward-twice: layer-l box losses reach layer l-1's refinement).

Co-Deformable-DETR (CO_DETR_SPEC.md 1.2) uses the same layers and refinement with `with_ref_point_head=False`
(a fixed positional query is passed to `forward` instead) and `with_final_norm=False` (no final LayerNorm), and
inverse_sigmoid eps `ref_eps=1e-5`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pipeline.models.box_ops import inverse_sigmoid
from pipeline.models.layers.deform_attn import MultiScaleDeformableAttention, SpatialHW, level_hw
from pipeline.models.layers.position_encoding import coordinate_to_encoding
from pipeline.models.transformer.encoder import FFN


class DinoDecoderLayer(nn.Module):
    def __init__(
        self,
        embed_dims: int = 256,
        num_heads: int = 8,
        num_levels: int = 5,
        num_points: int = 4,
        ffn_dim: int = 2048,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(embed_dims, num_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(embed_dims)
        self.cross_attn = MultiScaleDeformableAttention(embed_dims, num_heads, num_levels, num_points, dropout)
        self.norm2 = nn.LayerNorm(embed_dims)
        self.ffn = FFN(embed_dims, ffn_dim, dropout)
        self.norm3 = nn.LayerNorm(embed_dims)

    def forward(
        self,
        query: Tensor,
        query_pos: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        padding_mask: Tensor | None,
        attn_mask: Tensor | None = None,
        spatial_hw: SpatialHW | None = None,
        projected_value: Tensor | None = None,
    ) -> Tensor:
        """query, query_pos: (B, Q, C); reference_points: (B, Q, L, 4) cxcywh scaled by the valid ratios;
        memory: (B, S, C); attn_mask: (Q, Q) bool, True = blocked; spatial_hw: spatial_shapes as Python ints;
        projected_value: `cross_attn.project_value(memory, padding_mask)` if already computed, (B, S, C)."""
        qk = query + query_pos
        query = query + self.self_attn(qk, qk, query, attn_mask=attn_mask, need_weights=False)[0]
        query = self.norm1(query)
        query = self.cross_attn(
            query, reference_points, memory, spatial_shapes, level_start_index, padding_mask, query_pos=query_pos,
            spatial_hw=spatial_hw, projected_value=projected_value,
        )
        query = self.norm2(query)
        return self.norm3(self.ffn(query))


class DinoDecoder(nn.Module):
    """Decoder layers + `ref_point_head` (MLP 2C -> C -> C) + the shared final LayerNorm `norm`.

    with_ref_point_head=False: no `ref_point_head`, every call must pass a fixed `query_pos` (Co-Deformable);
    with_final_norm=False: `norm` is the identity (Co-Deformable's decoder has no final LayerNorm).
    """

    def __init__(self, layers: list[DinoDecoderLayer], embed_dims: int = 256, ref_eps: float = 1e-3,
                 box_pe_temperature: float = 10000.0, with_ref_point_head: bool = True,
                 with_final_norm: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.embed_dims = embed_dims
        self.ref_eps = ref_eps
        self.box_pe_temperature = box_pe_temperature
        self.ref_point_head: nn.Module | None = None
        if with_ref_point_head:
            self.ref_point_head = nn.Sequential(
                nn.Linear(2 * embed_dims, embed_dims), nn.ReLU(), nn.Linear(embed_dims, embed_dims)
            )
        self.norm: nn.Module = nn.LayerNorm(embed_dims) if with_final_norm else nn.Identity()

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def forward(
        self,
        query: Tensor,
        reference_boxes: Tensor,
        memory: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        valid_ratios: Tensor,
        padding_mask: Tensor | None,
        reg_branches: Sequence[nn.Module],
        attn_mask: Tensor | None = None,
        query_pos: Tensor | None = None,
        spatial_hw: SpatialHW | None = None,
        value_cache: dict[int, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Run all layers.

        query: (B, Q, C) content queries; reference_boxes: (B, Q, 4) cxcywh in [0, 1] (sigmoid space);
        memory: (B, S, C); valid_ratios: (B, L, 2) (w, h); padding_mask: (B, S) True = pad;
        reg_branches: at least num_layers modules C -> 4 (refinement of layer l uses reg_branches[l]);
        attn_mask: (Q, Q) bool True = blocked (denoising groups); query_pos: (B, Q, C) fixed positional
        query used *instead of* the per-layer `ref_point_head` embedding (None = Co-DINO behaviour);
        spatial_hw: spatial_shapes as Python ints, read from spatial_shapes once here if not given;
        value_cache: layer index -> that layer's projected memory (`project_value`), filled by the first pass
        and reused by later passes over the same memory (the aux query groups): one value projection per layer
        and step instead of one per pass (the same tensor; its gradients add up before the projection's
        backward). None: project in every pass.
        Returns hidden (num_layers, B, Q, C) after `norm` (the identity without a final norm), references
        (num_layers + 1, B, Q, 4): [initial, new_ref_0, ..., new_ref_{L-1}], the new refs not detached.
        """
        if query_pos is None and self.ref_point_head is None:
            raise ValueError("this decoder has no ref_point_head: pass a fixed query_pos")
        if spatial_hw is None:
            spatial_hw = level_hw(spatial_shapes)
        ratios = torch.cat([valid_ratios, valid_ratios], -1)[:, None]  # (B, 1, L, 4)
        hidden, references = [], [reference_boxes]
        output = query
        ref = reference_boxes
        for lid, layer in enumerate(self.layers):
            ref_input = ref[:, :, None] * ratios  # (B, Q, L, 4)
            if query_pos is None:
                assert self.ref_point_head is not None
                sine = coordinate_to_encoding(
                    ref_input[:, :, 0, :], self.embed_dims // 2, temperature=self.box_pe_temperature
                )
                pos = self.ref_point_head(sine)
            else:
                pos = query_pos
            projected = None if value_cache is None else value_cache.get(lid)
            if projected is None and value_cache is not None:
                projected = value_cache[lid] = layer.cross_attn.project_value(memory, padding_mask)
            output = layer(
                output, pos, ref_input, memory, spatial_shapes, level_start_index, padding_mask, attn_mask,
                spatial_hw, projected,
            )
            new_ref = (reg_branches[lid](output) + inverse_sigmoid(ref, eps=self.ref_eps)).sigmoid()
            ref = new_ref.detach()
            hidden.append(self.norm(output))
            references.append(new_ref)
        return torch.stack(hidden), torch.stack(references)
