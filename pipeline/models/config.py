"""Model configuration: a frozen dataclass tree whose defaults are the authors' Co-DINO 5-scale R50 1x numbers.

Sources: CO_DETR_SPEC.md (sections in brackets). Pure dataclasses, no torch import, so that configs load anywhere.
YAML files are loaded by `pipeline.config` (`from_dict(ModelConfig, d)` / `load`), which rejects unknown keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass

from pipeline.models.aux_heads.table import AUX_HEADS, ATSSConfig, FasterRCNNConfig, check_aux_heads

__all__ = ["ATSSConfig", "CoConfig", "FasterRCNNConfig", "ModelConfig", "ViTConfig"]  # head configs live in the table

ARCHS = ("co_dino", "co_deformable_detr")  # values of ModelConfig.arch


VIT_AUTHORS = "vit_authors"  # BackboneConfig.name of the authors' ViT (pipeline/models/backbones/vit.py) + SFP neck


@dataclass(frozen=True)
class ViTConfig:
    """The authors' ViT [6; golden fixture vit_l_sfp], used when `backbone.name: vit_authors`. Defaults: ViT-L of
    the COCO recipe (`co_dino_5scale_vit_large_coco`); LVIS: window 16, global (2, 5, ..., 23), use_lsj, 1536."""

    embed_dim: int = 1024  # C
    depth: int = 24  # number of blocks (= the layer count of the layer-wise lr decay)
    num_heads: int = 16  # attention heads (head dim 64)
    patch_size: int = 16  # stride of the token grid
    mlp_ratio: float = 8 / 3  # SwiGLU hidden = int(C * mlp_ratio) = 2730
    window_size: int = 24  # window side in tokens of the non-global blocks (0: every block global)
    global_blocks: tuple[int, ...] = (3, 7, 11, 15, 19, 23)  # blocks with global attention
    use_lsj: bool = False  # global rotary table fixed at img_size / patch_size (LSJ: square padded inputs)
    img_size: int = 1536  # training input side; only used with use_lsj (must equal the LSJ canvas)
    pretrain_img_size: int = 512  # position embedding grid = pretrain_img_size / patch_size (32 x 32)
    # EVA-02 weights the authors start from (`pretrained: true`: timm download; `weights:` a local/URI file)
    pretrained_name: str = "eva02_large_patch14_448.mim_m38m_ft_in22k_in1k"

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads or self.embed_dim % 4:
            raise ValueError(f"model.backbone.vit.embed_dim {self.embed_dim} must be a multiple of num_heads "
                             f"{self.num_heads} and of 4 (SFP)")  # fmt: skip
        if any(not 0 <= i < self.depth for i in self.global_blocks):
            raise ValueError(f"model.backbone.vit.global_blocks {list(self.global_blocks)} must be block indices "
                             f"in 0..{self.depth - 1} (depth {self.depth})")  # fmt: skip
        if self.window_size < 0:
            raise ValueError(f"model.backbone.vit.window_size must be >= 0, got {self.window_size}")
        if self.use_lsj and self.img_size % self.patch_size:
            raise ValueError(f"model.backbone.vit.img_size {self.img_size} must be a multiple of patch_size "
                             f"{self.patch_size} with use_lsj")  # fmt: skip


@dataclass(frozen=True)
class BackboneConfig:
    """Image backbone [1.1 Backbone]."""

    # timm model name (or an alias known to pipeline/models/backbones/timm_backbones.py), or "vit_authors": the
    # authors' ViT configured by `vit` below, with their SFP neck (pipeline/models/backbones/build.py)
    name: str = "resnet50"
    out_indices: tuple[int, ...] = (0, 1, 2, 3)  # stages returned: C2..C5 (strides 4..32)
    frozen_stages: int = 1  # stem + this many stages get no gradient (-1/0: nothing frozen)
    norm: str = "frozen_bn"  # "frozen_bn" (pretrained recipe) | "bn" (trainable, from-scratch recipe)
    pretrained: bool = False  # load timm/torchvision ImageNet weights (needs network or a cache)
    weights: str | None = None  # optional path of a backbone state dict to load
    checkpointing: bool = False  # activation checkpointing inside the backbone (memory only)
    drop_path_rate: float = 0.0  # stochastic depth (Swin-L: 0.3..0.6, ViT-L: 0.4)
    vit: ViTConfig = field(default_factory=ViTConfig)  # the authors' ViT (name "vit_authors" only)


@dataclass(frozen=True)
class NeckConfig:
    """ChannelMapper neck [1.1 Neck]: 1x1 conv + GN(32) per level, extra 3x3 s2 conv on the raw last map."""

    out_channels: int = 256  # = transformer.embed_dims
    num_outs: int = 5  # number of output levels (extra levels come from the last backbone map)


@dataclass(frozen=True)
class TransformerConfig:
    """Deformable encoder / DINO decoder with two-stage query selection [1.1 Encoder, Decoder, Two-stage]."""

    embed_dims: int = 256  # C
    num_heads: int = 8  # heads of MSDeformAttn and of the decoder self-attention
    num_levels: int = 5  # feature levels seen by MSDeformAttn (= neck.num_outs)
    num_points: int = 4  # sampling points per head and level
    num_encoder_layers: int = 6  # 9 in the "9encoder" variants
    num_decoder_layers: int = 6  # L
    ffn_dim: int = 2048  # FFN hidden size, encoder and decoder
    dropout: float = 0.0  # attention and FFN dropout
    num_queries: int = 900  # matching queries = two-stage top-k (1500 for ViT-L O365)
    encoder_checkpoint_layers: int = 4  # `with_cp`: activation checkpointing on the first N encoder layers
    pe_num_feats: int = 128  # sine PE features per axis (= embed_dims / 2)
    pe_temperature: float = 20.0  # map sine PE temperature (Co-DINO 20; Co-Deformable 10000)
    pe_normalize: bool = True  # normalise the cumulative sums to [0, 2pi]
    pe_offset: float = 0.0  # added before normalising (Co-Deformable -0.5)
    box_pe_temperature: float = 10000.0  # temperature of the sine embedding of reference boxes
    proposal_base_wh: float = 0.05  # encoder anchor w = h = base * 2**level
    proposal_valid_min: float = 0.01  # anchor valid if every coordinate > min ...
    proposal_valid_max: float = 0.99  # ... and < max
    ref_eps: float = 1e-3  # inverse_sigmoid eps in the decoder refinement and the head
    with_padding_mask: bool = True  # False = LSJ `with_attn_mask=False`: img_shape := padded shape, no mask


@dataclass(frozen=True)
class HeadConfig:
    """Prediction branches [1.1 Prediction branches and init]."""

    num_reg_fcs: int = 2  # hidden Linear+ReLU pairs in each reg branch (then Linear C->4)
    cls_prior_prob: float = 0.01  # class bias init = -log((1-p)/p) = -4.595


@dataclass(frozen=True)
class DenoisingConfig:
    """Contrastive denoising [1.1 CDN]."""

    enabled: bool = True  # add CDN queries in training
    num_dn_queries: int = 100  # dynamic groups: G = max(1, num_dn_queries // max_gt)
    label_noise: float = 0.5  # a label is resampled with probability label_noise * 0.5
    box_noise: float = 1.0  # corner noise scale (x half the box size)


@dataclass(frozen=True)
class LossConfig:
    """One-to-one losses [4.1]; the same weights for decoder layers, encoder proposals, DN and aux queries."""

    cls_loss: str = "qfl"  # "qfl" (Co-DINO: QualityFocalLoss) | "focal" (Co-Deformable: sigmoid focal loss)
    cls_weight: float = 1.0  # classification loss weight (Co-DINO QFL 1.0; Co-Deformable focal 2.0)
    qfl_beta: float = 2.0  # QFL modulating exponent
    focal_alpha: float = 0.25  # sigmoid focal loss alpha (cls_loss "focal")
    focal_gamma: float = 2.0  # sigmoid focal loss gamma (cls_loss "focal")
    bbox_weight: float = 5.0  # L1 on normalised cxcywh
    iou_weight: float = 2.0  # GIoU on pixel xyxy
    iou_eps: float = 1e-6  # eps of the IoU used as the QFL target (mmdet bbox_overlaps)
    # FedLoss (LVIS; pipeline/models/fed_loss.py): classification losses of the query head, ATSS and RoI heads
    # restricted to the batch's GT classes + classes sampled by weight image_count ** power, up to num_classes
    fed_loss: bool = False
    fed_loss_num_classes: int = 50  # classes per iteration (GT classes always in, even beyond this)
    fed_loss_power: float = 0.5  # weight = image_count ** power (Detic / detectron2: 0.5)
    # per label: training images containing it; filled from the shards' manifest by the stage driver (empty:
    # uniform weights, or the `fed_loss_weight` buffers of an imported checkpoint)
    fed_loss_image_counts: tuple[int, ...] = ()


@dataclass(frozen=True)
class MatcherConfig:
    """Hungarian matcher costs [4.1]."""

    cls_cost: float = 2.0  # FocalLossCost weight
    l1_cost: float = 5.0  # BBoxL1Cost weight (normalised cxcywh)
    giou_cost: float = 2.0  # IoUCost (GIoU, pixel xyxy) weight
    alpha: float = 0.25  # focal cost alpha
    gamma: float = 2.0  # focal cost gamma


@dataclass(frozen=True)
class TestConfig:
    """Inference post-processing [5.3]."""

    __test__ = False  # not a pytest class

    topk: int = 900  # top-k over Q*nc sigmoid scores before NMS (authors' 2.x: num_query; mmdet 3.x: 300)
    nms: str = "soft"  # "soft" (class-aware linear soft-NMS) | "hard" | "none"
    iou_threshold: float = 0.8  # NMS IoU threshold
    sigma: float = 0.5  # soft-NMS sigma (gaussian method only)
    min_score: float = 1e-3  # soft-NMS drops boxes whose decayed score falls below this
    max_per_img: int = 300  # detections kept per image
    score_threshold: float = 0.0  # drop detections with a score <= this (authors: 0)


def _head_configs() -> type:
    """A frozen dataclass with one field per row of the aux-head table (`model.co.<name>`, its config class), the
    base of CoConfig: a new head's config appears here without editing this file."""
    fields = [(name, spec.config, field(default_factory=spec.config)) for name, spec in AUX_HEADS.items()]
    cls = make_dataclass("AuxHeadConfigs", fields, frozen=True)
    cls.__module__ = __name__
    return cls


AuxHeadConfigs = _head_configs()


@dataclass(frozen=True)
class CoConfig(AuxHeadConfigs):  # type: ignore[misc, valid-type]
    """Collaborative hybrid assignment training [2.1, 3]; plus one field per aux head of the table
    (`atss: ATSSConfig`, `faster_rcnn: FasterRCNNConfig`, ...; pipeline/models/aux_heads/table.py)."""

    lambda1: float = 1.0  # weight of the aux-query decoder losses
    lambda2: float = 2.0  # weight of the aux heads (encoder) losses
    aux_heads: tuple[str, ...] = ("atss", "faster_rcnn")  # K = len(aux_heads) <= 6, repeats allowed; () = K=0
    min_pos_queries: int = 9  # aux query group size lower bound (padded with negatives)
    max_pos_queries: int = 300  # aux query group size upper bound
    num_dec_layers_factor: int = 6  # aux head weights are base * factor * lambda2 (= 12)

    def __post_init__(self) -> None:
        check_aux_heads(self.aux_heads)
        for name in ("lambda1", "lambda2"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.co.{name}: value {getattr(self, name)!r} is negative; expected >= 0")
        if self.num_dec_layers_factor < 1:
            raise ValueError(f"model.co.num_dec_layers_factor must be >= 1, got {self.num_dec_layers_factor}")


@dataclass(frozen=True)
class ModelConfig:
    """Co-DETR model. Defaults: Co-DINO `co_dino_5scale_r50_1x_coco` (80 classes, 900 queries, K=2).

    `arch` picks the query head / transformer flavour (CO_DETR_SPEC.md 1.2): "co_dino" (DINO decoder, CDN, QFL) or
    "co_deformable_detr" (Deformable-DETR two-stage + box refine + mixed selection, no DN, focal loss; see
    configs/model/co_deformable_detr_r50.yaml for the numbers that go with it).
    """

    arch: str = "co_dino"  # "co_dino" | "co_deformable_detr"
    num_classes: int = 80  # nc
    backbone: BackboneConfig = field(default_factory=BackboneConfig)  # image backbone
    neck: NeckConfig = field(default_factory=NeckConfig)  # channel mapper
    transformer: TransformerConfig = field(default_factory=TransformerConfig)  # encoder / decoder
    head: HeadConfig = field(default_factory=HeadConfig)  # prediction branches
    dn: DenoisingConfig = field(default_factory=DenoisingConfig)  # contrastive denoising
    loss: LossConfig = field(default_factory=LossConfig)  # one-to-one loss weights
    matcher: MatcherConfig = field(default_factory=MatcherConfig)  # Hungarian costs
    test: TestConfig = field(default_factory=TestConfig)  # post-processing
    co: CoConfig = field(default_factory=CoConfig)  # collaborative auxiliary heads

    def __post_init__(self) -> None:
        t = self.transformer
        if self.arch not in ARCHS:
            raise ValueError(f"model.arch must be one of {ARCHS}, got {self.arch!r}")
        if self.loss.cls_loss not in ("qfl", "focal"):
            raise ValueError(f"model.loss.cls_loss must be 'qfl' or 'focal', got {self.loss.cls_loss!r}")
        if self.arch == "co_deformable_detr" and self.dn.enabled:
            raise ValueError("model.dn.enabled must be false for arch 'co_deformable_detr' (it has no denoising)")
        if self.num_classes < 1:
            raise ValueError(f"model.num_classes must be >= 1, got {self.num_classes}")
        if t.embed_dims != self.neck.out_channels:
            raise ValueError(
                f"model.neck.out_channels ({self.neck.out_channels}) must equal "
                f"model.transformer.embed_dims ({t.embed_dims})"
            )
        if t.num_levels != self.neck.num_outs:
            raise ValueError(
                f"model.transformer.num_levels ({t.num_levels}) must equal model.neck.num_outs "
                f"({self.neck.num_outs})"
            )
        if 2 * t.pe_num_feats != t.embed_dims:
            raise ValueError(
                f"model.transformer.pe_num_feats ({t.pe_num_feats}) must be embed_dims / 2 ({t.embed_dims // 2})"
            )
        if t.embed_dims % t.num_heads:
            raise ValueError(f"embed_dims {t.embed_dims} is not divisible by num_heads {t.num_heads}")
        if self.test.nms not in ("soft", "hard", "none"):
            raise ValueError(f"model.test.nms must be 'soft', 'hard' or 'none', got {self.test.nms!r}")
        counts = self.loss.fed_loss_image_counts
        if self.loss.fed_loss and counts and len(counts) != self.num_classes:
            raise ValueError(f"model.loss.fed_loss_image_counts has {len(counts)} entries, expected num_classes "
                             f"{self.num_classes}")  # fmt: skip
        if self.loss.fed_loss and self.loss.fed_loss_num_classes < 1:
            raise ValueError(f"model.loss.fed_loss_num_classes must be >= 1, got {self.loss.fed_loss_num_classes}")
        if self.backbone.norm not in ("frozen_bn", "bn"):
            raise ValueError(f"model.backbone.norm must be 'frozen_bn' or 'bn', got {self.backbone.norm!r}")

