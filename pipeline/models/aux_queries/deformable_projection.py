"""Co-Deformable-DETR's customized positive queries (CO_DETR_SPEC.md 3.2): projections with coordinate features."""

from __future__ import annotations

from torch import Tensor, nn

from pipeline.models.aux_queries.groups import AuxGroup
from pipeline.models.box_ops import inverse_sigmoid
from pipeline.models.layers.position_encoding import get_proposal_pos_embed


class DeformableAuxQueryProjection(nn.Module):
    """Co-Deformable aux queries of one head's group (authors' `CoDeformableDetrTransformer.forward_aux`):

        t         = LN_2C(Linear_2C->2C^(i)(PE(inverse_sigmoid(box))))           `aux_pos_trans.i`, `_norm.i`
        query_pos = t[..., :C] + head_pos_embed.weight[i]                         (B, M, C)
        content   = t[..., C:] + LN_C(Linear_C->C^(i)(feat))                      `pos_feats_trans.i`, `_norm.i`

    `head_pos_embed` reproduces a bug the authors keep for their R50 numbers: it is built as
    `nn.Embedding(num_co_heads, 1, 1, embed_dims)`, i.e. embedding_dim = 1 (the 1 meant as a shape landed in
    `embedding_dim`, then padding_idx=1, max_norm=256, both without effect since `.weight` is indexed directly).
    The weight is therefore (num_heads, 1): one learned scalar per head, broadcast over all C channels, Xavier-
    uniform init by the transformer init. Released checkpoints hold this (2, 1) tensor, so we keep the shape.

    All weights Xavier-uniform (dim > 1), biases and norms PyTorch defaults. Training only.
    """

    def __init__(self, num_heads: int = 2, embed_dims: int = 256) -> None:
        super().__init__()
        if embed_dims % 2:
            raise ValueError(f"embed_dims must be even, got {embed_dims}")
        self.embed_dims = embed_dims
        self.head_pos_embed = nn.Embedding(num_heads, 1)  # the (num_heads, 1) bug, see the class docstring
        c2 = 2 * embed_dims
        self.aux_pos_trans = nn.ModuleList([nn.Linear(c2, c2) for _ in range(num_heads)])
        self.aux_pos_trans_norm = nn.ModuleList([nn.LayerNorm(c2) for _ in range(num_heads)])
        self.pos_feats_trans = nn.ModuleList([nn.Linear(embed_dims, embed_dims) for _ in range(num_heads)])
        self.pos_feats_norm = nn.ModuleList([nn.LayerNorm(embed_dims) for _ in range(num_heads)])
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, boxes: Tensor, feats: Tensor, head_idx: int) -> tuple[Tensor, Tensor]:
        """boxes: (B, M, 4) normalised cxcywh (not clamped); feats: (B, M, C) coordinate features.
        Returns (content query (B, M, C), query_pos (B, M, C))."""
        if not 0 <= head_idx < len(self.aux_pos_trans):
            raise ValueError(f"head_idx {head_idx} out of range for {len(self.aux_pos_trans)} aux heads")
        if feats.shape[:-1] != boxes.shape[:-1] or feats.shape[-1] != self.embed_dims:
            raise ValueError(f"feats must be (B, M, {self.embed_dims}) for boxes {tuple(boxes.shape)}, "
                             f"got {tuple(feats.shape)}")  # fmt: skip
        pe = get_proposal_pos_embed(inverse_sigmoid(boxes), num_feats=self.embed_dims // 2)  # (B, M, 2C)
        t = self.aux_pos_trans_norm[head_idx](self.aux_pos_trans[head_idx](pe))
        query_pos, content = t.split(self.embed_dims, dim=-1)
        content = content + self.pos_feats_norm[head_idx](self.pos_feats_trans[head_idx](feats.to(content.dtype)))
        query_pos = query_pos + self.head_pos_embed.weight[head_idx]  # (1,) broadcast over the C channels
        return content, query_pos

    def queries(self, group: AuxGroup, head_idx: int) -> tuple[Tensor, Tensor | None]:
        """(content (B, M, C), query_pos (B, M, C)) of an aux group; the group must carry coordinate features."""
        if group.feats is None:
            raise ValueError(f"aux head {group.head!r} exported no coordinate features; Co-Deformable needs them "
                             "(build ATSS with with_coord_feat=True)")  # fmt: skip
        return self(group.boxes, group.feats, head_idx)
