"""Every collaborative (auxiliary) loss weight, as a function of the config, and the one place they are applied.

Paper eq. 6: L = sum_l (L_dec_l + lambda1 * sum_i L_dec_{i,l} + lambda2 * L_enc). The authors' code writes each
auxiliary-head (encoder-side) weight as `base * num_dec_layers * lambda2` (the sum over 6 layers of the encoder
term) and multiplies the auxiliary-decoder losses (customized positive queries) by lambda1 (CO_DETR_SPEC.md 2.1).
Aux heads and `aux_decoder_losses` return UNWEIGHTED terms; `weigh(losses, loss_weights(cfg))` multiplies each
term by its effective weight, once (CoDETR.aux_losses). The base weights are config fields: the `*_weight`
fields of each head's config (named per loss key by the head table, pipeline/models/aux_heads/table.py) and, for
the aux decoder, the one-to-one LossConfig weights (the authors reuse the head's loss modules).

At the defaults (lambda1 = 1, lambda2 = 2, num_dec_layers_factor = 6, K = 2) the effective weights equal the
authors' (`python jobs/model_info.py --config ...` prints this table for any config):

| term                         | loss              | base | factor             | effective | key                   |
|------------------------------|-------------------|------|--------------------|-----------|-----------------------|
| RPN classification           | BCE               | 1    | 6 * lambda2        | 12        | loss_rpn_cls          |
| RPN box                      | L1 on deltas      | 1    | 6 * lambda2        | 12        | loss_rpn_bbox         |
| RoI classification           | softmax CE        | 1    | 6 * lambda2        | 12        | loss_cls0             |
| RoI box                      | GIoU (decoded)    | 10   | 6 * lambda2        | 120       | loss_bbox0            |
| ATSS classification          | sigmoid focal     | 1    | 6 * lambda2        | 12        | loss_cls1             |
| ATSS box                     | GIoU (decoded)    | 2    | 6 * lambda2        | 24        | loss_bbox1            |
| ATSS centerness              | BCE               | 1    | 6 * lambda2        | 12        | loss_centerness1      |
| aux decoder classification   | QFL (beta 2)      | 1    | lambda1            | 1         | [d{l}.]loss_cls_aux{k}  |
| aux decoder box              | L1 (norm. cxcywh) | 5    | lambda1            | 5         | [d{l}.]loss_bbox_aux{k} |
| aux decoder IoU              | GIoU (pixels)     | 2    | lambda1            | 2         | [d{l}.]loss_iou_aux{k}  |

Co-Deformable-DETR's aux decoder classification is its one-to-one focal loss with weight 2.0 (x lambda1), read from
the same LossConfig field. The one-to-one (main, encoder and denoising) losses are not scaled by lambda1/lambda2;
DINOHead weights them with ModelConfig.loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from pipeline.models.aux_heads.table import AUX_HEADS, group_order

if TYPE_CHECKING:
    from pipeline.models.config import ModelConfig

V = TypeVar("V")

AUX_DECODER_TERMS = {"loss_cls_aux{k}": "cls_weight", "loss_bbox_aux{k}": "bbox_weight",
                     "loss_iou_aux{k}": "iou_weight"}  # key template -> LossConfig field


@dataclass(frozen=True)
class AuxDecoderWeights:
    """Effective (x lambda1) weights of one aux query group's three terms (every decoder layer alike)."""

    cls: float  # quality focal loss (Co-DINO) / sigmoid focal loss (Co-Deformable)
    bbox: float  # L1 on normalised cxcywh
    iou: float  # GIoU on pixel xyxy

    def keys(self, k: int, num_layers: int) -> dict[str, float]:
        """Loss key -> weight for group k over all layers (`d{l}.` prefixes for l < num_layers - 1)."""
        out = {}
        for layer in range(num_layers):
            prefix = "" if layer == num_layers - 1 else f"d{layer}."
            out.update({f"{prefix}loss_cls_aux{k}": self.cls, f"{prefix}loss_bbox_aux{k}": self.bbox,
                        f"{prefix}loss_iou_aux{k}": self.iou})  # fmt: skip
        return out


@dataclass(frozen=True)
class WeightRow:
    """One line of the weight table: key (aux decoder: the last layer's, the d{l}. copies weigh the same)."""

    key: str
    source: str  # "<head>.<config field>" or "aux_decoder.<LossConfig field>"
    base: float
    factor: str
    effective: float


def aux_decoder_weights(cfg: ModelConfig) -> AuxDecoderWeights:
    """The aux query losses reuse the one-to-one loss weights, x lambda1."""
    lam = cfg.co.lambda1
    return AuxDecoderWeights(cls=cfg.loss.cls_weight * lam, bbox=cfg.loss.bbox_weight * lam,
                             iou=cfg.loss.iou_weight * lam)  # fmt: skip


def loss_weight_rows(cfg: ModelConfig) -> list[WeightRow]:
    """The weight table of a model config: every aux head term (group order) and every aux decoder term."""
    co = cfg.co
    enc = co.num_dec_layers_factor * co.lambda2
    rows = []
    for k, name in enumerate(group_order(co.aux_heads)):
        spec = AUX_HEADS[name]
        head_cfg = getattr(co, name)
        for (key, base), field_name in zip(spec.base_weights(head_cfg, k).items(), spec.loss_weights.values()):
            factor = f"{co.num_dec_layers_factor} * lambda2"
            rows.append(WeightRow(key, f"{name}.{field_name}", base, factor, base * enc))
    for k in range(len(co.aux_heads)):
        for template, field_name in AUX_DECODER_TERMS.items():
            base = float(getattr(cfg.loss, field_name))
            rows.append(WeightRow(template.format(k=k), f"aux_decoder.loss.{field_name}", base, "lambda1",
                                  base * co.lambda1))  # fmt: skip
    return rows


def loss_weights(cfg: ModelConfig) -> dict[str, float]:
    """Every aux loss key of a model config -> its effective weight (aux decoder keys of all decoder layers)."""
    out = {}
    layers = cfg.transformer.num_decoder_layers
    for row in loss_weight_rows(cfg):
        if row.source.startswith("aux_decoder."):
            prefixes = [f"d{layer}." for layer in range(layers - 1)] + [""]
            out.update({p + row.key: row.effective for p in prefixes})
        else:
            out[row.key] = row.effective
    return out


def weigh(losses: Mapping[str, V], weights: Mapping[str, float]) -> dict[str, V]:
    """THE weighting step: each loss term times its weight. Keys without "loss" (metrics such as `acc0`) pass
    unchanged; a loss key missing from `weights` is a one-line KeyError (every term must be in the table)."""
    out: dict[str, Any] = {}
    for key, value in losses.items():
        if key in weights:
            out[key] = value * weights[key]  # type: ignore[operator]
        elif "loss" in key:
            raise KeyError(f"loss term {key!r} has no weight in the loss table (known: {', '.join(list(weights)[:12])}"
                           f"{' ...' if len(weights) > 12 else ''})")  # fmt: skip
        else:
            out[key] = value
    return out


def format_table(rows: list[WeightRow]) -> str:
    """The weight table as aligned text."""
    lines = [f"{'loss key':<22s} {'base':>7s}  {'factor':<16s} {'effective':>9s}  source"]
    for r in rows:
        key = ("[d*.]" + r.key) if r.source.startswith("aux_decoder.") else r.key
        lines.append(f"{key:<22s} {r.base:7.3g}  {r.factor:<16s} {r.effective:9.4g}  {r.source}")
    return "\n".join(lines)
