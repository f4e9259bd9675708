"""Co-DETR detector (Co-DINO, Co-Deformable-DETR): the one file that knows every part.

    model = build_model(ModelConfig())          # authors' Co-DINO R50, K = len(cfg.co.aux_heads)
    model = build_model(load_config("configs/model/co_deformable_detr_r50.yaml").model)  # Co-Deformable-DETR
    losses = model(images, masks, targets)      # train mode: dict of named, already-weighted loss terms
    dets = model.eval()(images, masks)          # eval mode: list of dict(boxes xyxy, scores, labels)

Data flow (CO_DETR_SPEC.md 1.1): backbone -> neck -> encoder -> two-stage top-k -> decoder (+ CDN queries in
training) -> head. With K auxiliary heads (spec 2, 3) the encoder memory also feeds the multi-scale adapter,
each aux head computes its own losses and exports positive coordinates, and each head's customized positive
queries run their own decoder pass (`transformer.decode`) with the shared branches, losses x lambda1.
Aux group k follows the authors' order: RoI heads (Faster R-CNN) first, then dense heads (ATSS).
`cfg.arch == "co_deformable_detr"` swaps in `co_deformable.CoDeformableTransformer` (4 levels, 300 queries, mixed
selection, no DN), focal classification losses, binary encoder labels, and aux queries with coordinate features
(spec 1.2, 3.2, 4.2); the loss names are the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from pipeline.models.config import ModelConfig, TestConfig
from pipeline.models.layers.padding_mask import padding_masks_from_sizes
from pipeline.models.loss_weights import loss_weights, weigh
from pipeline.models.query_head.denoising import CdnQueryGenerator, DenoisingQueries
from pipeline.models.query_head.dino_head import DINOHead
from pipeline.models.transformer.co_dino import CoDinoTransformer, EncoderOutput
from pipeline.models.transformer.query_selection import QuerySelection

if TYPE_CHECKING:
    from pipeline.models.aux_queries.deformable_projection import DeformableAuxQueryProjection
    from pipeline.models.aux_queries.groups import AuxQueryProjection

AUX_PREFIXES = ("aux_heads.", "adapter.", "aux_query_proj.")  # training-only parts, dropped at export


@dataclass
class DetectorOutputs:
    """Everything one forward pass produces (matching part separated from the denoising part).

    logits: (L, B, Q, nc) raw class logits per decoder layer; boxes: (L, B, Q, 4) sigmoid cxcywh normalised by
    the unpadded size; references: (L + 1, B, Q, 4) decoder reference boxes; selection: encoder top-k;
    enc: encoder memory; dn_logits / dn_boxes: (L, B, P, ...) of the denoising slots or None;
    img_sizes: (B, 2) long (h, w) used to normalise boxes.
    """

    logits: Tensor
    boxes: Tensor
    references: Tensor
    selection: QuerySelection
    enc: EncoderOutput
    img_sizes: Tensor
    dn: DenoisingQueries | None = None
    dn_logits: Tensor | None = None
    dn_boxes: Tensor | None = None


class CoDETR(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        neck: nn.Module,
        transformer: CoDinoTransformer,
        head: DINOHead,
        denoising: CdnQueryGenerator | None = None,
        test_cfg: TestConfig | None = None,
        with_padding_mask: bool = True,
        aux_heads: list[nn.Module] | None = None,
        adapter: nn.Module | None = None,
        aux_query_proj: AuxQueryProjection | DeformableAuxQueryProjection | None = None,
        aux_group_size: tuple[int, int] = (9, 300),
        aux_loss_weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.transformer = transformer
        self.head = head
        self.denoising = denoising
        self.test_cfg = test_cfg or TestConfig()
        self.with_padding_mask = with_padding_mask
        self.num_classes = head.num_classes
        # --- collaborative auxiliary part (training only; K = len(aux_heads), 0 = plain DINO) ---
        self.aux_heads = nn.ModuleList(aux_heads or [])
        self.adapter = adapter
        self.aux_query_proj = aux_query_proj
        self.aux_group_size = aux_group_size
        # aux loss key -> effective weight (lambda1, lambda2, per-term bases), applied once in `aux_losses`;
        # None = unweighted terms (build_model always passes loss_weights(cfg))
        self.aux_loss_weights = dict(aux_loss_weights) if aux_loss_weights is not None else None
        if len(self.aux_heads) and (adapter is None or aux_query_proj is None):
            raise ValueError("aux heads need an adapter and an aux query projection")

    # ------------------------------------------------------------------------------------------------------
    def image_sizes(
        self, images: Tensor, masks: Tensor | None, targets: list[dict[str, Tensor]] | None, img_sizes: Tensor | None
    ) -> Tensor:
        """(B, 2) long (h, w) of the unpadded images: given, else from masks, else targets' `size`, else full."""
        b, _, h, w = images.shape
        if img_sizes is None and masks is not None:
            valid = ~masks
            img_sizes = torch.stack([valid.any(2).sum(1), valid.any(1).sum(1)], 1)
        if img_sizes is None and targets is not None and all("size" in t for t in targets):
            img_sizes = torch.stack([torch.as_tensor(t["size"]) for t in targets])
        if img_sizes is None:
            img_sizes = torch.tensor([[h, w]] * b)
        return img_sizes.to(device=images.device, dtype=torch.long)

    def features(self, images: Tensor) -> list[Tensor]:
        """images (B, 3, H, W) -> neck maps, list of (B, C, h_l, w_l)."""
        return list(self.neck(self.backbone(images)))

    def run(self, images: Tensor, img_sizes: Tensor, dn: DenoisingQueries | None = None) -> DetectorOutputs:
        """Backbone to head. img_sizes: (B, 2) (h, w); the padding mask is the complement of the top-left
        img_sizes rectangles (or empty when `with_padding_mask` is False, the authors' LSJ setting)."""
        mask = padding_masks_from_sizes(img_sizes, tuple(images.shape[-2:]))
        if not self.with_padding_mask:
            mask = torch.zeros_like(mask)
        feats = self.features(images)
        out = self.transformer(
            feats,
            mask,
            self.head.cls_branches,
            self.head.reg_branches,
            dn_query=dn.query if dn is not None else None,
            dn_box_logits=dn.box_logits if dn is not None else None,
            attn_mask=dn.attn_mask if dn is not None else None,
        )
        hidden = out.hidden
        if dn is not None and dn.pad_size == 0 and self.denoising is not None:
            # no GT in the batch: keep the label embedding in the graph (DDP), as the authors do
            hidden = torch.cat([hidden[:1] + 0.0 * self.denoising.label_embedding.weight[0, 0], hidden[1:]])
        logits, boxes = self.head.predict(hidden, out.references)
        p = dn.pad_size if dn is not None else 0
        return DetectorOutputs(
            logits=logits[:, :, p:],
            boxes=boxes[:, :, p:],
            references=out.references[:, :, p:],
            selection=out.selection,
            enc=out.enc,
            img_sizes=img_sizes,
            dn=dn,
            dn_logits=logits[:, :, :p] if dn is not None else None,
            dn_boxes=boxes[:, :, :p] if dn is not None else None,
        )

    def forward(
        self,
        images: Tensor,
        masks: Tensor | None = None,
        targets: list[dict[str, Tensor]] | None = None,
        img_sizes: Tensor | None = None,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """images: (B, 3, H, W) normalised, zero-padded bottom/right; masks: (B, H, W) True = padding;
        targets: B dicts with `boxes (N, 4)` cxcywh normalised by the unpadded size, `labels (N,)`, `size`,
        optionally `orig_size` (h, w) for rescaling detections.
        Train: dict of losses. Eval: list of B dicts boxes (K, 4) xyxy pixels (orig_size if targets give it,
        else network input), scores (K,), labels (K,)."""
        sizes = self.image_sizes(images, masks, targets, img_sizes)
        if self.training:
            if targets is None:
                raise ValueError("CoDETR in train mode needs targets; call model.eval() for inference")
            return self.loss(images, sizes, targets)
        return self.predict(images, sizes, targets)

    # ------------------------------------------------------------------------------------------------------
    def loss(self, images: Tensor, img_sizes: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        targets = self._loss_targets(targets, img_sizes, images.shape[-2:])
        if not self.with_padding_mask:
            img_sizes = torch.tensor([list(images.shape[-2:])] * len(targets), device=images.device)
        dn = self.denoising(targets) if self.denoising is not None else None
        out = self.run(images, img_sizes, dn)
        losses = self.head.loss(out.logits, out.boxes, out.selection.logits, out.selection.boxes, targets, img_sizes)
        if dn is not None and out.dn_logits is not None and out.dn_boxes is not None:
            dn_targets = dn.targets(targets, self.num_classes)
            losses.update(self.head.dn_loss(out.dn_logits, out.dn_boxes, dn_targets, img_sizes))
        if len(self.aux_heads):
            losses.update(self.aux_losses(out.enc, targets, img_sizes))
        return losses

    def aux_losses(
        self, enc: EncoderOutput, targets: list[dict[str, Tensor]], img_sizes: Tensor
    ) -> dict[str, Tensor]:
        """Aux heads on the adapter maps, then one decoder pass per head's customized positive queries; every
        term comes back unweighted and is weighted here, once (`loss_weights.weigh`)."""
        from pipeline.models.aux_queries.groups import aux_decoder_losses, build_aux_groups

        assert self.adapter is not None and self.aux_query_proj is not None
        maps = self.adapter(enc.memory, enc.spatial_hw)  # L + 1 maps (B, C, h, w)
        focal = (self.head.focal_alpha, self.head.focal_gamma) if self.head.cls_loss == "focal" else None
        losses: dict[str, Tensor] = {}
        for k, aux_head in enumerate(self.aux_heads):
            head_losses, positives = aux_head.forward_train(maps, targets, img_sizes)
            losses.update(head_losses)
            group = build_aux_groups(positives, img_sizes, self.num_classes, *self.aux_group_size)
            query, query_pos = self.aux_query_proj.queries(group, k)  # query_pos None: per-layer (Co-DINO)
            hidden, refs = self.transformer.decode(query, group.boxes, enc, self.head.reg_branches,
                                                   query_pos=query_pos)  # fmt: skip
            logits, boxes = self.head.predict(hidden, refs)
            losses.update(aux_decoder_losses(logits, boxes, group, img_sizes, head_index=k, focal=focal,
                                             qfl_beta=self.head.qfl_beta))  # fmt: skip
        return losses if self.aux_loss_weights is None else weigh(losses, self.aux_loss_weights)

    def _loss_targets(
        self, targets: list[dict[str, Tensor]], img_sizes: Tensor, batch_shape: torch.Size
    ) -> list[dict[str, Tensor]]:
        """Targets on the model's device; in LSJ mode (no padding mask) boxes are renormalised to the padded
        canvas, as the authors overwrite img_shape with the batch shape."""
        device = img_sizes.device
        if not self.with_padding_mask:  # (B, 4) (w, h, w, h) / canvas, on the device: no host sync
            canvas = torch.tensor([batch_shape[1], batch_shape[0]], dtype=torch.float32, device=device)
            scales = (img_sizes.flip(-1).to(torch.float32) / canvas).repeat(1, 2)
        out = []
        for i, t in enumerate(targets):
            boxes = t["boxes"].to(device=device, dtype=torch.float32).reshape(-1, 4)
            if not self.with_padding_mask:
                boxes = boxes * scales[i]
            out.append({**t, "boxes": boxes, "labels": t["labels"].to(device).reshape(-1).long()})
        return out

    # ------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(
        self,
        images: Tensor,
        img_sizes: Tensor,
        targets: list[dict[str, Tensor]] | None = None,
        amp_dtype: torch.dtype | None = None,
    ) -> list[dict[str, Tensor]]:
        """Eval-mode forward (see `forward`). `amp_dtype`: run the network (`run`) under autocast in that dtype on
        the images' device, and the post-processing (`detections`) on its outputs cast back to fp32."""
        run_sizes = img_sizes
        if not self.with_padding_mask:  # LSJ: boxes are normalised by the padded canvas
            run_sizes = torch.tensor([list(images.shape[-2:])] * images.shape[0], device=images.device)
        if amp_dtype is None:
            out = self.run(images, run_sizes)
            logits, boxes = out.logits[-1], out.boxes[-1]
        else:
            with torch.autocast(images.device.type, dtype=amp_dtype):
                out = self.run(images, run_sizes)
            logits, boxes = out.logits[-1].float(), out.boxes[-1].float()
        return detections(logits, boxes, run_sizes, self.test_cfg, source_scales(targets, img_sizes))

    def inference_state_dict(self) -> dict[str, Tensor]:
        """State dict of the deployed (K = 0) model: the auxiliary heads, adapter and aux projections dropped."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(AUX_PREFIXES)}


# ----------------------------------------------------------------------------------------------------------
def source_scales(
    targets: list[dict[str, Tensor]] | None, img_sizes: Tensor
) -> list[tuple[float, float] | None] | None:
    """Per image (sy, sx): network-input pixels per source pixel of the image *content*, or None (no rescale).

    From the target's `scale_factor` (sx, sy) = content size / source size (`pipeline.data.transforms.to_target`);
    under LSJ the content is the resized image before the canvas pad, so the canvas (`size`) must not be used.
    Targets without `scale_factor` fall back to img_sizes (B, 2) (h, w) / `orig_size` (exact for every policy without
    a canvas, the pre-LSJ behaviour)."""
    if targets is None:
        return None
    out: list[tuple[float, float] | None] = []
    for t, (h, w) in zip(targets, img_sizes.tolist()):
        if "scale_factor" in t:
            sx, sy = (float(v) for v in torch.as_tensor(t["scale_factor"]).tolist())
            out.append((sy, sx))
        elif "orig_size" in t:
            oh, ow = (float(v) for v in torch.as_tensor(t["orig_size"]).tolist())
            out.append((h / oh, w / ow))
        else:
            out.append(None)
    return out


def detections(
    logits: Tensor,
    boxes: Tensor,
    img_sizes: Tensor,
    cfg: TestConfig,
    scales: list[tuple[float, float] | None] | None = None,
) -> list[dict[str, Tensor]]:
    """Last-layer outputs -> detections (spec 5.3, `postprocess.detr_postprocess`): top-k of the Q*nc sigmoid
    scores, clamped pixel xyxy, divided by the per-image scale (sy, sx) when given, class-aware NMS, at most
    max_per_img. logits: (B, Q, nc); boxes: (B, Q, 4) sigmoid cxcywh; img_sizes: (B, 2) (h, w) the boxes are
    normalised by."""
    from pipeline.models.query_head.postprocess import detr_postprocess

    scales = scales or [None] * len(logits)
    out = []
    for cls, box, size, scale in zip(logits, boxes, img_sizes, scales):
        det = detr_postprocess(
            cls, box, size, scale_hw=scale, topk=cfg.topk, nms=cfg.nms, iou_threshold=cfg.iou_threshold,
            sigma=cfg.sigma, min_score=cfg.min_score, max_per_img=cfg.max_per_img,
            score_threshold=cfg.score_threshold,
        )  # fmt: skip
        out.append({"boxes": det["boxes"], "scores": det["scores"], "labels": det["labels"]})
    return out


def build_model(cfg: ModelConfig) -> CoDETR:
    """The one place that maps a ModelConfig to modules."""
    from pipeline.models.backbones.build import build_backbone, build_neck  # authors' ViT + SFP, or timm
    from pipeline.models.layers.position_encoding import SinePositionalEncoding
    from pipeline.models.query_head.matcher import HungarianMatcher
    from pipeline.models.transformer.decoder import DinoDecoder, DinoDecoderLayer
    from pipeline.models.transformer.encoder import DeformableEncoder, DeformableEncoderLayer

    t = cfg.transformer
    deformable = cfg.arch == "co_deformable_detr"
    backbone = build_backbone(cfg.backbone)
    neck = build_neck(backbone, cfg.neck.out_channels, cfg.neck.num_outs)
    attn = dict(embed_dims=t.embed_dims, num_heads=t.num_heads, num_levels=t.num_levels, num_points=t.num_points,
                ffn_dim=t.ffn_dim, dropout=t.dropout)  # fmt: skip
    encoder = DeformableEncoder(
        [DeformableEncoderLayer(**attn) for _ in range(t.num_encoder_layers)], t.encoder_checkpoint_layers
    )
    decoder = DinoDecoder([DinoDecoderLayer(**attn) for _ in range(t.num_decoder_layers)], t.embed_dims,
                          ref_eps=t.ref_eps, box_pe_temperature=t.box_pe_temperature,
                          with_ref_point_head=not deformable, with_final_norm=not deformable)  # fmt: skip
    pe = SinePositionalEncoding(t.pe_num_feats, t.pe_temperature, t.pe_normalize, t.pe_offset)
    transformer_args = (encoder, decoder, t.embed_dims, t.num_levels, t.num_queries, pe, t.proposal_base_wh,
                        (t.proposal_valid_min, t.proposal_valid_max))  # fmt: skip
    if deformable:
        from pipeline.models.transformer.co_deformable import CoDeformableTransformer

        transformer: CoDinoTransformer = CoDeformableTransformer(*transformer_args)
    else:
        transformer = CoDinoTransformer(*transformer_args)
    m = cfg.matcher
    matcher = HungarianMatcher(m.cls_cost, m.l1_cost, m.giou_cost, m.alpha, m.gamma)
    head = DINOHead(
        cfg.num_classes, t.embed_dims, t.num_decoder_layers, cfg.head.num_reg_fcs, cfg.head.cls_prior_prob,
        matcher, cfg.loss.cls_weight, cfg.loss.bbox_weight, cfg.loss.iou_weight, cfg.loss.qfl_beta, t.ref_eps,
        cfg.loss.cls_loss, cfg.loss.focal_alpha, cfg.loss.focal_gamma, binary_enc_labels=deformable,
    )  # fmt: skip
    denoising = None
    if cfg.dn.enabled:
        denoising = CdnQueryGenerator(cfg.num_classes, t.embed_dims, t.num_queries, cfg.dn.label_noise,
                                      cfg.dn.box_noise, cfg.dn.num_dn_queries)  # fmt: skip
    aux_heads, adapter, proj = _build_aux(cfg)
    model = CoDETR(
        backbone, neck, transformer, head, denoising, cfg.test, t.with_padding_mask, aux_heads, adapter, proj,
        (cfg.co.min_pos_queries, cfg.co.max_pos_queries), loss_weights(cfg),
    )  # fmt: skip
    if cfg.loss.fed_loss:  # LVIS: query head, ATSS and RoI class losses over GT + sampled classes
        from pipeline.models.fed_loss import fed_weights

        weight = fed_weights(cfg.loss.fed_loss_image_counts, cfg.num_classes, cfg.loss.fed_loss_power)
        attach_fed_loss(model, cfg.num_classes, cfg.loss.fed_loss_num_classes, weight)
    return model


def attach_fed_loss(model: nn.Module, num_classes: int, num_sample: int, weight: Tensor) -> list[str]:
    """Give the query head, every ATSS head and every RoI box head a FedLoss (shared weights, own buffer);
    returns the attached module names. `model` is a CoDETR."""
    from pipeline.models.aux_heads.atss import ATSSHead
    from pipeline.models.aux_heads.roi_head import RoIHead
    from pipeline.models.fed_loss import FedLoss

    owners: list[tuple[str, nn.Module]] = [("head", model.head)]
    for name, m in model.named_modules():
        if isinstance(m, ATSSHead):
            owners.append((name, m))
        elif isinstance(m, RoIHead):
            owners.append((f"{name}.bbox_head", m.bbox_head))
    for _, owner in owners:
        owner.fed_loss = FedLoss(num_classes, num_sample, weight)
    return [f"{name}.fed_loss" for name, _ in owners]


def _build_aux(
    cfg: ModelConfig,
) -> tuple[list[nn.Module], nn.Module | None, AuxQueryProjection | DeformableAuxQueryProjection | None]:
    """Aux heads from the head table (pipeline/models/aux_heads/table.py) in the authors' group order (RoI heads
    first, then dense heads; repeats allowed, each its own group k), adapter and projections."""
    if not cfg.co.aux_heads:
        return [], None, None
    import importlib

    from pipeline.models.aux_heads.adapter import MultiScaleAdapter
    from pipeline.models.aux_heads.table import AUX_HEADS, AuxBuildContext, adapter_strides, group_order
    from pipeline.models.aux_queries.groups import AuxQueryProjection

    deformable = cfg.arch == "co_deformable_detr"  # aux queries with coordinate features (spec 3.1 point 5)
    strides = adapter_strides(cfg.transformer.num_levels + 1)  # L memory maps + the adapter's extra level
    heads: list[nn.Module] = []
    for k, name in enumerate(group_order(cfg.co.aux_heads)):
        spec = AUX_HEADS[name]
        module, fn = spec.builder.split(":")
        ctx = AuxBuildContext(cfg.num_classes, cfg.transformer.embed_dims, strides, k, deformable)
        heads.append(getattr(importlib.import_module(module), fn)(getattr(cfg.co, name), ctx))
    adapter = MultiScaleAdapter(cfg.transformer.embed_dims)  # L memory maps + 1 extra (Co-DINO 6, Co-Deform 5)
    if deformable:
        from pipeline.models.aux_queries.deformable_projection import DeformableAuxQueryProjection

        return heads, adapter, DeformableAuxQueryProjection(len(heads), cfg.transformer.embed_dims)
    return heads, adapter, AuxQueryProjection(len(heads), cfg.transformer.embed_dims)
