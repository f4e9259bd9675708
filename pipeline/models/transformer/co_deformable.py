"""Co-Deformable-DETR query side (CO_DETR_SPEC.md 1.2, 3.2 "Co-Deformable"): transformer and aux-query projection.

Differences from Co-DINO (`transformer.CoDinoTransformer`, whose `encode` / `decode` are reused as they are):
- two-stage selection: top-`num_queries` (300) encoder tokens by `enc_outputs_class[..., 0]` (the first class
  logit, the authors' Deformable-DETR choice), not the max over classes; the encoder loss sees *all* tokens
  (`QuerySelection.logits/boxes` hold all S tokens here, matched with binary labels by the head);
- mixed selection: content queries = the learned `query_embedding` (Q x C); positional query = the first C channels
  of LN_2C(Linear_2C->2C(PE(top-k box logits))) (`pos_trans`, `pos_trans_norm`), fixed across decoder layers
  (the decoder is built without `ref_point_head` and without a final LayerNorm, inverse_sigmoid eps 1e-5);
- no denoising queries;
- aux queries (`DeformableAuxQueryProjection`) carry both a positional and a content part, plus the coordinate
  feature of each positive (ATSS: adapter feature at the anchor; Faster R-CNN: mean-pooled RoI feature).

Key names follow the authors' up to the prefix: `query_head.query_embedding` -> `transformer.query_embedding`,
`query_head.transformer.pos_trans*` -> `transformer.pos_trans*`, `query_head.transformer.{aux_pos_trans*,
pos_feats_*, head_pos_embed}` -> `aux_query_proj.*` (training only, dropped by `CoDETR.inference_state_dict`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pipeline.models.layers.position_encoding import SinePositionalEncoding, get_proposal_pos_embed
from pipeline.models.transformer.co_dino import CoDinoTransformer, TransformerOutput
from pipeline.models.transformer.decoder import DinoDecoder
from pipeline.models.transformer.encoder import DeformableEncoder
from pipeline.models.transformer.query_selection import QuerySelection


def select_topk_first_class(enc_logits: Tensor, enc_box_logits: Tensor, k: int) -> QuerySelection:
    """Deformable-DETR two-stage selection: top-k tokens by their first class logit.

    enc_logits: (B, S, nc); enc_box_logits: (B, S, 4) = reg(output_memory) + anchor logits (+inf where invalid).
    Returns a QuerySelection whose `logits` (B, S, nc) and `boxes` (B, S, 4) sigmoid cxcywh are those of *all*
    tokens (the Co-Deformable encoder loss input), `ref_logits` (B, k, 4) the detached top-k box logits and
    `indices` (B, k).
    """
    if k > enc_logits.shape[1]:
        raise ValueError(f"cannot select {k} queries from {enc_logits.shape[1]} encoder tokens; lower num_queries")
    indices = torch.topk(enc_logits[..., 0], k, dim=1)[1]
    box_logits = torch.gather(enc_box_logits, 1, indices.unsqueeze(-1).expand(-1, -1, 4))
    return QuerySelection(enc_logits, enc_box_logits.sigmoid(), box_logits.detach(), indices)


class CoDeformableTransformer(CoDinoTransformer):
    """Deformable encoder + two-stage / mixed-selection Deformable-DETR decoder (box refine, look-forward-twice).

    The decoder must be a `DinoDecoder(..., with_ref_point_head=False, with_final_norm=False, ref_eps=1e-5)`.
    Parameters beyond the encoder/decoder: `level_embeds` (L, C), `enc_output` / `enc_output_norm`,
    `query_embedding` (Q, C), `pos_trans` (2C -> 2C), `pos_trans_norm` (LN 2C).
    """

    def __init__(
        self,
        encoder: DeformableEncoder,
        decoder: DinoDecoder,
        embed_dims: int = 256,
        num_levels: int = 4,
        num_queries: int = 300,
        positional_encoding: SinePositionalEncoding | None = None,
        proposal_base_wh: float = 0.05,
        proposal_valid_range: tuple[float, float] = (0.01, 0.99),
    ) -> None:
        if decoder.ref_point_head is not None:
            raise ValueError("Co-Deformable uses a fixed query_pos: build the decoder with with_ref_point_head=False")
        positional_encoding = positional_encoding or SinePositionalEncoding(embed_dims // 2, 10000.0, offset=-0.5)
        super().__init__(encoder, decoder, embed_dims, num_levels, num_queries, positional_encoding,
                         proposal_base_wh, proposal_valid_range)  # fmt: skip
        del self.query_embed  # Co-DINO's name; the Co-Deformable content queries are the authors' `query_embedding`
        self.query_embedding = nn.Embedding(num_queries, embed_dims)
        self.pos_trans = nn.Linear(2 * embed_dims, 2 * embed_dims)
        self.pos_trans_norm = nn.LayerNorm(2 * embed_dims)
        self.init_weights()  # again, now over pos_trans and query_embedding (mmdet's transformer init)

    def topk(self, enc_logits: Tensor, enc_box_logits: Tensor) -> QuerySelection:
        """Top-`num_queries` by the first class logit; the selection carries every token's logits and boxes for
        the encoder loss (see select_topk_first_class)."""
        return select_topk_first_class(enc_logits, enc_box_logits, self.num_queries)

    def query_pos(self, ref_logits: Tensor) -> Tensor:
        """(B, Q, 4) detached box logits -> (B, Q, C) = first C channels of LN_2C(Linear(PE(ref_logits)))."""
        pe = get_proposal_pos_embed(ref_logits, num_feats=self.embed_dims // 2)  # (B, Q, 2C)
        return self.pos_trans_norm(self.pos_trans(pe))[..., : self.embed_dims]

    def forward(
        self,
        feats: Sequence[Tensor],
        mask: Tensor,
        cls_branches: Sequence[nn.Module],
        reg_branches: Sequence[nn.Module],
        dn_query: Tensor | None = None,
        dn_box_logits: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> TransformerOutput:
        """feats: L neck maps (B, C, h, w); mask: (B, H, W) True = pad. The denoising arguments exist for the
        CoDETR call signature and must be None. hidden: (L_dec, B, Q, C) (no final norm)."""
        if dn_query is not None or dn_box_logits is not None or attn_mask is not None:
            raise ValueError("Co-Deformable-DETR has no denoising queries (model.dn.enabled must be false)")
        enc = self.encode(feats, mask)
        n = self.decoder.num_layers
        sel = self.select_queries(enc, cls_branches[n], reg_branches[n])
        b = enc.memory.shape[0]
        query = self.query_embedding.weight[None].expand(b, -1, -1)
        query_pos = self.query_pos(sel.ref_logits)
        hidden, references = self.decode(query, sel.ref_logits.sigmoid(), enc, reg_branches, query_pos=query_pos)
        return TransformerOutput(enc, sel, hidden, references)


