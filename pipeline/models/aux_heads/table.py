"""The table of auxiliary heads: one row per head name (torch-free, so that configs load without torch).

A row (`AuxHeadSpec`) holds everything the rest of the code needs to know about a head:

| column        | read by                                 | meaning                                             |
|---------------|-----------------------------------------|-----------------------------------------------------|
| config        | models/config.py (`CoConfig.<name>`)    | the head's config dataclass (`model.co.<name>`)     |
| builder       | models/co_detr.py `_build_aux`          | "module:function" building the head                 |
| group         | co_detr.py, checkpoints/convert.py      | "roi" heads first, then "dense" (authors' order)    |
| loss_weights  | models/loss_weights.py (weighs once)    | loss key template -> config field of its base weight |
| class_params  | train/init.py (class remap)             | name parts of parameters whose rows are classes     |
| checkpoint    | checkpoints/convert.py                  | (authors' key regex, our key under aux_heads.{k}.)  |

Loss key templates: `{k}` is the head's group index (suffix of the authors' keys, e.g. `loss_cls1` for ATSS at
K = 2), `{r}` the same but empty for group 0 (the authors' unsuffixed `loss_rpn_cls`). A head returns exactly
the keys of its templates (plus metrics without "loss" in the name), UNWEIGHTED; every loss term is multiplied by
`base x num_dec_layers_factor x lambda2` once, in `loss_weights.weigh` (CO_DETR_SPEC.md 2.1).

Adding a head = its file in `aux_heads/` (module + `build(cfg, ctx)`) + its config class and row here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# ------------------------------------------------------------------------------------------- config classes


@dataclass(frozen=True)
class ATSSConfig:
    """ATSS auxiliary head [2.2]; *_weight are base weights, x lambda2 * num_dec_layers_factor."""

    stacked_convs: int = 1  # conv+GN+ReLU per tower
    anchor_scale: float = 8.0  # anchor size = scale * stride, ratio 1, one anchor per location
    strides: tuple[int, ...] = (4, 8, 16, 32, 64, 128)  # adapter map strides (() = the adapter's)
    topk: int = 9  # ATSS candidates per level and GT
    coder_stds: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2)  # DeltaXYWH target stds
    focal_alpha: float = 0.25  # sigmoid focal loss alpha
    focal_gamma: float = 2.0  # sigmoid focal loss gamma
    cls_weight: float = 1.0  # focal, x12 -> 12
    bbox_weight: float = 2.0  # GIoU, x12 -> 24
    centerness_weight: float = 1.0  # BCE, x12 -> 12


@dataclass(frozen=True)
class FasterRCNNConfig:
    """RPN + RoI head auxiliary head [2.3]; *_weight are base weights (x lambda2 * factor)."""

    anchor_octave_base_scale: float = 4.0  # RPN anchor base scale
    anchor_scales_per_octave: int = 3  # RPN scales per octave
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # RPN anchor ratios (9 anchors / location)
    strides: tuple[int, ...] = (4, 8, 16, 32, 64, 128)  # adapter map strides (() = the adapter's)
    rpn_pos_iou: float = 0.7  # RPN MaxIoU positive threshold
    rpn_neg_iou: float = 0.3  # RPN MaxIoU negative threshold
    rpn_min_pos_iou: float = 0.3  # RPN low-quality match threshold
    rpn_num_samples: int = 256  # RPN sampler size per image
    rpn_pos_fraction: float = 0.5  # RPN sampler positive fraction
    rpn_nms_pre: int = 4000  # proposals kept per level before NMS (training)
    rpn_nms_iou: float = 0.7  # proposal NMS threshold
    rpn_max_per_img: int = 1000  # proposals kept per image
    rpn_cls_weight: float = 1.0  # BCE, x12
    rpn_bbox_weight: float = 1.0  # L1 on deltas, x12
    roi_pos_iou: float = 0.5  # RoI MaxIoU positive threshold (= negative, = min_pos)
    roi_num_samples: int = 512  # RoI sampler size per image
    roi_pos_fraction: float = 0.25  # RoI sampler positive fraction
    roi_add_gt_as_proposals: bool = True  # GT boxes join the proposals
    roi_output_size: int = 7  # RoIAlign output size
    roi_finest_scale: int = 56  # level mapping scale (Co-Deformable 112)
    roi_fc_dim: int = 1024  # Shared2FC hidden size
    roi_coder_stds: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2)  # DeltaXYWH target stds
    roi_cls_weight: float = 1.0  # softmax CE, x12
    roi_bbox_weight: float = 10.0  # GIoU on decoded boxes, x12 -> 120


@dataclass(frozen=True)
class RetinaNetConfig:
    """RetinaNet auxiliary head (paper Tables 1, 8; mmdet RetinaHead defaults, one stacked conv, GIoU on decoded
    boxes); *_weight are base weights (x lambda2 * factor)."""

    stacked_convs: int = 1  # conv+ReLU per tower (the original has 4; the authors' aux ATSS 1)
    strides: tuple[int, ...] = ()  # adapter map strides (() = the adapter's)
    octave_base_scale: float = 4.0  # anchor base scale (x stride)
    scales_per_octave: int = 3  # scales 4 * 2^(i/3)
    ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # 9 anchors per location
    pos_iou: float = 0.5  # MaxIoU positive threshold (>=)
    neg_iou: float = 0.4  # MaxIoU negative threshold (<)
    min_pos_iou: float = 0.0  # low-quality match threshold
    coder_stds: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)  # DeltaXYWH stds (RetinaNet's)
    prior_prob: float = 0.01  # classification bias prior
    focal_alpha: float = 0.25  # sigmoid focal loss alpha
    focal_gamma: float = 2.0  # sigmoid focal loss gamma
    cls_weight: float = 1.0  # focal, x12
    bbox_weight: float = 2.0  # GIoU on decoded boxes, x12 -> 24


@dataclass(frozen=True)
class FCOSConfig:
    """FCOS auxiliary head (paper Tables 1, 8; mmdet FCOS with centre sampling, norm_on_bbox, centerness on the
    regression branch, GIoU; one stacked conv); *_weight are base weights (x lambda2 * factor)."""

    stacked_convs: int = 1  # conv+GN+ReLU per tower
    strides: tuple[int, ...] = ()  # adapter map strides (() = the adapter's)
    regress_ranges: tuple[tuple[float, float], ...] = ()  # per level; () = (-1, 8s_0), (8s_0, 8s_1), ..., (.., inf)
    center_sampling: bool = True  # positives only inside the GT's centre region
    center_sample_radius: float = 1.5  # centre region half-size in strides
    export_scale: float = 8.0  # exported query box: a square of export_scale x stride around the point
    prior_prob: float = 0.01  # classification bias prior
    focal_alpha: float = 0.25  # sigmoid focal loss alpha
    focal_gamma: float = 2.0  # sigmoid focal loss gamma
    cls_weight: float = 1.0  # focal, x12
    bbox_weight: float = 1.0  # GIoU weighted by centerness targets, x12
    centerness_weight: float = 1.0  # BCE, x12


@dataclass(frozen=True)
class GFLConfig:
    """GFL auxiliary head (paper Table 8; mmdet GFLHead: ATSS assignment, QFL, DFL + integral regression, GIoU;
    one stacked conv); *_weight are base weights (x lambda2 * factor)."""

    stacked_convs: int = 1  # conv+GN+ReLU per tower
    strides: tuple[int, ...] = ()  # adapter map strides (() = the adapter's)
    anchor_scale: float = 8.0  # anchor size = scale * stride, one anchor per location
    topk: int = 9  # ATSS candidates per level and GT
    reg_max: int = 16  # distance bins 0..reg_max (stride units)
    qfl_beta: float = 2.0  # quality focal loss exponent
    prior_prob: float = 0.01  # classification bias prior
    cls_weight: float = 1.0  # QFL, x12
    bbox_weight: float = 2.0  # GIoU, x12 -> 24
    dfl_weight: float = 0.25  # distribution focal loss, x12 -> 3


@dataclass(frozen=True)
class PAAConfig:
    """PAA auxiliary head (paper Table 8; Kim & Lee 2020 with mmdet `PAAHead` defaults: MaxIoU 0.1 candidates,
    GMM split of their losses, IoU-prediction branch; one stacked conv); *_weight are base weights (x lambda2 *
    factor). cls_weight and bbox_weight also weigh the per-anchor score that PAA splits, as mmdet's loss modules."""

    stacked_convs: int = 1  # conv+GN+ReLU per tower (the original has 4; the authors' aux ATSS 1)
    strides: tuple[int, ...] = ()  # adapter map strides (() = the adapter's)
    anchor_scale: float = 8.0  # one anchor per location, size 8 x stride (octave_base_scale 8, 1 scale)
    coder_stds: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2)  # DeltaXYWH target stds
    candidate_iou: float = 0.1  # MaxIoU pos = neg threshold of the initial candidates (min_pos_iou 0)
    topk: int = 9  # candidates per level and GT fitted by the GMM
    prior_prob: float = 0.01  # classification bias prior
    focal_alpha: float = 0.25  # sigmoid focal loss alpha
    focal_gamma: float = 2.0  # sigmoid focal loss gamma
    cls_weight: float = 1.0  # focal, x12
    bbox_weight: float = 1.3  # GIoU weighted by the IoU target, x12
    iou_weight: float = 0.5  # BCE of the IoU branch, x12


# ------------------------------------------------------------------------------------------------- the rows


@dataclass(frozen=True)
class AuxBuildContext:
    """What a builder gets besides its config: nc, channels, the adapter's strides, the group index k (loss key
    suffix), and whether positives must carry coordinate features (Co-Deformable)."""

    num_classes: int
    embed_dims: int
    strides: tuple[int, ...]
    loss_index: int
    with_coord_feat: bool = False

    def strides_of(self, configured: tuple[int, ...]) -> tuple[int, ...]:
        """A head config's strides, () meaning the adapter's."""
        return tuple(configured) or self.strides


@dataclass(frozen=True)
class AuxHeadSpec:
    """One row of the table (see the module docstring)."""

    name: str
    config: type
    builder: str
    group: str  # "roi" | "dense"
    loss_weights: Mapping[str, str]  # loss key template -> config field holding its base weight
    class_params: tuple[str, ...]
    checkpoint: tuple[tuple[str, str], ...] = ()

    def loss_keys(self, k: int) -> list[str]:
        return [t.format(k=k, r="" if k == 0 else k) for t in self.loss_weights]

    def base_weights(self, cfg: object, k: int) -> dict[str, float]:
        """Loss key of group k -> base weight read from the head's config."""
        return {t.format(k=k, r="" if k == 0 else k): float(getattr(cfg, f)) for t, f in self.loss_weights.items()}


_ROWS = (
    AuxHeadSpec(
        name="faster_rcnn", config=FasterRCNNConfig, builder="pipeline.models.aux_heads.faster_rcnn:build",
        group="roi",
        loss_weights={"loss_rpn_cls{r}": "rpn_cls_weight", "loss_rpn_bbox{r}": "rpn_bbox_weight",
                      "loss_cls{k}": "roi_cls_weight", "loss_bbox{k}": "roi_bbox_weight"},
        class_params=("fc_cls", "fc_reg"),
        checkpoint=((r"^rpn_head\.(.*)$", r"rpn_head.\1"), (r"^roi_head\.0\.(.*)$", r"roi_head.\1")),
    ),
    AuxHeadSpec(
        name="atss", config=ATSSConfig, builder="pipeline.models.aux_heads.atss:build", group="dense",
        loss_weights={"loss_cls{k}": "cls_weight", "loss_bbox{k}": "bbox_weight",
                      "loss_centerness{k}": "centerness_weight"},
        class_params=("atss_cls",),
        checkpoint=((r"^bbox_head\.0\.(.*)$", r"\1"),),
    ),
    AuxHeadSpec(
        name="retinanet", config=RetinaNetConfig, builder="pipeline.models.aux_heads.retinanet:build",
        group="dense", loss_weights={"loss_cls{k}": "cls_weight", "loss_bbox{k}": "bbox_weight"},
        class_params=("retina_cls",),  # no released checkpoint with this head: no key mapping
    ),
    AuxHeadSpec(
        name="fcos", config=FCOSConfig, builder="pipeline.models.aux_heads.fcos:build", group="dense",
        loss_weights={"loss_cls{k}": "cls_weight", "loss_bbox{k}": "bbox_weight",
                      "loss_centerness{k}": "centerness_weight"},
        class_params=("conv_cls",),  # no released checkpoint with this head: no key mapping
    ),
    AuxHeadSpec(
        name="gfl", config=GFLConfig, builder="pipeline.models.aux_heads.gfl:build", group="dense",
        loss_weights={"loss_cls{k}": "cls_weight", "loss_bbox{k}": "bbox_weight", "loss_dfl{k}": "dfl_weight"},
        class_params=("gfl_cls",),  # no released checkpoint with this head: no key mapping
    ),
    AuxHeadSpec(
        name="paa", config=PAAConfig, builder="pipeline.models.aux_heads.paa:build", group="dense",
        loss_weights={"loss_cls{k}": "cls_weight", "loss_bbox{k}": "bbox_weight", "loss_iou{k}": "iou_weight"},
        class_params=("atss_cls",),  # mmdet PAAHead key names; no released Co-DETR checkpoint with this head
    ),
)

AUX_HEADS: dict[str, AuxHeadSpec] = {row.name: row for row in _ROWS}
GROUPS = ("roi", "dense")  # group order of the aux query groups: RoI heads first, then dense heads
MAX_HEADS = 6  # K <= 6 (paper Table 7)


def check_aux_heads(names: tuple[str, ...] | list[str]) -> None:
    """One-line ValueError for an unknown head name or K > MAX_HEADS."""
    for name in names:
        if name not in AUX_HEADS:
            raise ValueError(f"unknown aux head {name!r} in model.co.aux_heads; known heads: {', '.join(AUX_HEADS)}")
    if len(names) > MAX_HEADS:
        raise ValueError(f"model.co.aux_heads has {len(names)} heads, at most {MAX_HEADS} are supported (K <= 6)")


def group_order(names: tuple[str, ...] | list[str]) -> list[str]:
    """The authors' group order: RoI heads first, then dense heads; stable, repeats kept."""
    check_aux_heads(names)
    return [n for g in GROUPS for n in names if AUX_HEADS[n].group == g]


def adapter_strides(num_maps: int) -> tuple[int, ...]:
    """Strides of the adapter's maps: the last is 128 (stride-64 top level + the adapter's extra level)."""
    return tuple(128 >> (num_maps - 1 - i) for i in range(num_maps))


def class_param_keys() -> tuple[str, ...]:
    """Name substrings of every head's class-dependent parameters (rows = classes)."""
    return tuple(dict.fromkeys(k for row in _ROWS for k in row.class_params))
