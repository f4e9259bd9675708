"""Co-DINO transformer: level embeddings + deformable encoder, two-stage query selection, DINO decoder.

The prediction branches live in the head (`dino_head.DINOHead`) and are passed in, as in the authors' code:
the encoder proposals use branch index `num_decoder_layers` (the 7th), the decoder refinement branches 0..L-1.

Entry points
- `encode(feats, mask)` -> EncoderOutput (memory and everything needed to attend to it).
- `select_queries(enc, cls_branch, reg_branch)` -> QuerySelection (top-k proposals, encoder loss inputs).
- `decode(query, reference_boxes, enc, reg_branches, attn_mask=None, query_pos=None)`: one decoder pass; used
  for the main queries (with denoising queries prepended) and for every auxiliary positive-query group.
- `forward(...)` = encode + select + decode of [DN queries | query_embed].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from pipeline.models.layers.deform_attn import MultiScaleDeformableAttention, SpatialHW, shapes_tensor
from pipeline.models.layers.padding_mask import downsample_mask, valid_ratio
from pipeline.models.layers.position_encoding import SinePositionalEncoding
from pipeline.models.transformer.decoder import DinoDecoder
from pipeline.models.transformer.encoder import DeformableEncoder
from pipeline.models.transformer.query_selection import QuerySelection, encoder_proposals, select_topk


@dataclass
class EncoderOutput:
    """memory: (B, S, C), S = sum_l h_l*w_l, levels flattened row-major in order;
    spatial_shapes: (L, 2) long (h, w); level_start_index: (L,) long; valid_ratios: (B, L, 2) (w, h);
    padding_mask: (B, S) bool, True = padding; spatial_hw: spatial_shapes as Python ints, taken from the feature
    maps' shapes once per forward, so that no consumer reads `spatial_shapes` back from the device;
    value_cache: each decoder layer's projected memory, filled by the first decoder pass in training and reused by
    the aux query groups' passes over the same memory (`DinoDecoder.forward`)."""

    memory: Tensor
    spatial_shapes: Tensor
    level_start_index: Tensor
    valid_ratios: Tensor
    padding_mask: Tensor
    spatial_hw: SpatialHW
    value_cache: dict[int, Tensor] = field(default_factory=dict)  # decoder layer -> projected memory (training)


@dataclass
class TransformerOutput:
    """hidden: (L, B, Q_dn + Q, C) decoder states after the final norm;
    references: (L + 1, B, Q_dn + Q, 4) sigmoid cxcywh, [initial, refined after layer 0..L-1] (not detached)."""

    enc: EncoderOutput
    selection: QuerySelection
    hidden: Tensor
    references: Tensor


class CoDinoTransformer(nn.Module):
    def __init__(
        self,
        encoder: DeformableEncoder,
        decoder: DinoDecoder,
        embed_dims: int = 256,
        num_levels: int = 5,
        num_queries: int = 900,
        positional_encoding: SinePositionalEncoding | None = None,
        proposal_base_wh: float = 0.05,
        proposal_valid_range: tuple[float, float] = (0.01, 0.99),
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.embed_dims = embed_dims
        self.num_queries = num_queries
        self.positional_encoding = positional_encoding or SinePositionalEncoding(embed_dims // 2, 20.0)
        self.proposal_base_wh = proposal_base_wh
        self.proposal_valid_range = proposal_valid_range
        self.level_embeds = nn.Parameter(torch.empty(num_levels, embed_dims))
        self.enc_output = nn.Linear(embed_dims, embed_dims)
        self.enc_output_norm = nn.LayerNorm(embed_dims)
        self.query_embed = nn.Embedding(num_queries, embed_dims)  # content queries (mixed selection)
        self.init_weights()

    def init_weights(self) -> None:
        """mmdet: Xavier-uniform on every matrix, then mmcv's MSDeformAttn init, normal level/query embeds."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MultiScaleDeformableAttention):
                m.init_weights()
        nn.init.normal_(self.level_embeds)
        for name in ("query_embed", "query_embedding"):  # content queries (Co-DINO / Co-Deformable name)
            if isinstance(getattr(self, name, None), nn.Embedding):
                nn.init.normal_(getattr(self, name).weight)

    # ------------------------------------------------------------------------------------------------------
    def encode(self, feats: Sequence[Tensor], mask: Tensor) -> EncoderOutput:
        """feats: L maps (B, C, h_l, w_l); mask: (B, H, W) bool True = padding, at input resolution.

        The mask is nearest-downsampled to each level (`downsample_mask` == F.interpolate default), as the authors do.
        """
        flat, masks, pos_flat, shapes = [], [], [], []
        level_masks = []
        for lvl, feat in enumerate(feats):
            h, w = feat.shape[-2:]  # ints (SymInts under torch.export: the ONNX graph keeps any image size)
            m = downsample_mask(mask, h, w)  # (B, h, w)
            pos = self.positional_encoding(m)  # (B, C, h, w)
            shapes.append((h, w))
            level_masks.append(m)
            flat.append(feat.flatten(2).transpose(1, 2))
            masks.append(m.flatten(1))
            pos_flat.append(pos.flatten(2).transpose(1, 2) + self.level_embeds[lvl].view(1, 1, -1))
        src = torch.cat(flat, 1)
        padding_mask = torch.cat(masks, 1)
        pos = torch.cat(pos_flat, 1)
        spatial_shapes = shapes_tensor(shapes, src.device)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([valid_ratio(m) for m in level_masks], 1)
        spatial_hw = tuple(shapes)
        memory = self.encoder(src, pos, spatial_shapes, level_start_index, valid_ratios, padding_mask, spatial_hw)
        return EncoderOutput(memory, spatial_shapes, level_start_index, valid_ratios, padding_mask, spatial_hw)

    def select_queries(self, enc: EncoderOutput, cls_branch: nn.Module, reg_branch: nn.Module) -> QuerySelection:
        """Encoder proposals scored by the encoder branches; top-`num_queries` by max class logit."""
        lo, hi = self.proposal_valid_range
        memory, anchor_logits = encoder_proposals(
            enc.memory, enc.padding_mask, enc.spatial_hw, self.proposal_base_wh, lo, hi
        )
        output_memory = self.enc_output_norm(self.enc_output(memory))
        enc_logits = cls_branch(output_memory)
        enc_box_logits = reg_branch(output_memory) + anchor_logits
        return self.topk(enc_logits, enc_box_logits)

    def topk(self, enc_logits: Tensor, enc_box_logits: Tensor) -> QuerySelection:
        """DINO selection by the max class logit. enc_logits: (B, S, nc); enc_box_logits: (B, S, 4)."""
        return select_topk(enc_logits, enc_box_logits, self.num_queries)

    def decode(
        self,
        query: Tensor,
        reference_boxes: Tensor,
        enc: EncoderOutput,
        reg_branches: Sequence[nn.Module],
        attn_mask: Tensor | None = None,
        query_pos: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """One decoder pass over the encoder memory.

        query: (B, M, C) content queries; reference_boxes: (B, M, 4) cxcywh normalised (sigmoid space, not
        clamped); attn_mask: (M, M) bool True = blocked; query_pos: optional fixed (B, M, C) positional query.
        Returns hidden (L, B, M, C), references (L + 1, B, M, 4) (see DinoDecoder.forward).
        """
        return self.decoder(
            query,
            reference_boxes,
            enc.memory,
            enc.spatial_shapes,
            enc.level_start_index,
            enc.valid_ratios,
            enc.padding_mask,
            reg_branches,
            attn_mask=attn_mask,
            query_pos=query_pos,
            spatial_hw=enc.spatial_hw,
            value_cache=enc.value_cache if self.training else None,  # shared by the main and aux query passes
        )

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
        """feats: L neck maps (B, C, h, w); mask: (B, H, W) True = pad; dn_query: (B, P, C), dn_box_logits:
        (B, P, 4) inverse-sigmoid cxcywh of the denoising queries (P = pad_size); attn_mask: (P+Q, P+Q)."""
        enc = self.encode(feats, mask)
        n = self.decoder.num_layers
        sel = self.select_queries(enc, cls_branches[n], reg_branches[n])
        b = enc.memory.shape[0]
        query = self.query_embed.weight[None].expand(b, -1, -1)
        ref_logits = sel.ref_logits
        if dn_query is not None and dn_box_logits is not None:
            query = torch.cat([dn_query, query], 1)
            ref_logits = torch.cat([dn_box_logits, ref_logits], 1)
        hidden, references = self.decode(query, ref_logits.sigmoid(), enc, reg_branches, attn_mask=attn_mask)
        return TransformerOutput(enc, sel, hidden, references)
