"""Every loss weight of Co-DINO in one table, as a function of lambda1, lambda2 and the number of decoder layers.

Paper eq. 6: L = sum_l (L_dec_l + lambda1 * sum_i L_dec_{i,l} + lambda2 * L_enc). The authors' code writes each
auxiliary-head (encoder-side) weight as `base * num_dec_layers * lambda2` (the sum over 6 layers of the encoder
term) and multiplies the auxiliary-decoder losses (customized positive queries) by lambda1 (CO_DETR_SPEC.md 2.1).

At the defaults (lambda1 = 1.0, lambda2 = 2.0, num_dec_layers = 6) the effective weights equal the authors':

| term                         | loss              | base | factor             | effective | authors' key          |
|------------------------------|-------------------|------|--------------------|-----------|-----------------------|
| ATSS classification          | sigmoid focal     | 1    | 6 * lambda2        | 12        | loss_cls1             |
| ATSS box                     | GIoU (decoded)    | 2    | 6 * lambda2        | 24        | loss_bbox1            |
| ATSS centerness              | BCE               | 1    | 6 * lambda2        | 12        | loss_centerness1      |
| RPN classification           | BCE               | 1    | 6 * lambda2        | 12        | loss_rpn_cls          |
| RPN box                      | L1 on deltas      | 1    | 6 * lambda2        | 12        | loss_rpn_bbox         |
| RoI classification           | softmax CE        | 1    | 6 * lambda2        | 12        | loss_cls0             |
| RoI box                      | GIoU (decoded)    | 10   | 6 * lambda2        | 120       | loss_bbox0            |
| aux decoder classification   | QFL (beta 2)      | 1    | lambda1            | 1         | loss_cls_aux{k}       |
| aux decoder box              | L1 (norm. cxcywh) | 5    | lambda1            | 5         | loss_bbox_aux{k}      |
| aux decoder IoU              | GIoU (pixels)     | 2    | lambda1            | 2         | loss_iou_aux{k}       |

Co-Deformable-DETR (`model.arch: co_deformable_detr`) uses the same table except the aux decoder classification,
a sigmoid focal loss with the main head's weight 2.0 (x lambda1), as its one-to-one classification.

The one-to-one (main, encoder and denoising) losses are not scaled by lambda1/lambda2 (QFL 1, L1 5, GIoU 2); they
live in ModelConfig's loss weights.
"""

from __future__ import annotations

from dataclasses import dataclass

# The authors' base weights (before the lambda factors), from co_dino_5scale_r50_1x_coco.py.
ATSS_BASE = {"cls": 1.0, "bbox": 2.0, "centerness": 1.0}
RPN_BASE = {"cls": 1.0, "bbox": 1.0}
ROI_BASE = {"cls": 1.0, "bbox": 10.0}
AUX_DECODER_BASE = {"cls": 1.0, "bbox": 5.0, "iou": 2.0}


@dataclass(frozen=True)
class AtssWeights:
    cls: float  # sigmoid focal loss (gamma 2, alpha 0.25), averaged over #positives
    bbox: float  # GIoU on decoded boxes, weighted by centerness targets, averaged over their sum
    centerness: float  # BCE on the centerness logit, averaged over #positives


@dataclass(frozen=True)
class RpnWeights:
    cls: float  # BCE over sampled anchors
    bbox: float  # L1 on encoded deltas


@dataclass(frozen=True)
class RoiWeights:
    cls: float  # softmax CE over sampled RoIs
    bbox: float  # GIoU on decoded boxes, averaged over sampled RoIs


@dataclass(frozen=True)
class AuxDecoderWeights:
    cls: float  # quality focal loss on the customized positive queries
    bbox: float  # L1 on normalised cxcywh
    iou: float  # GIoU on pixel xyxy


@dataclass(frozen=True)
class CoLossWeights:
    """Effective weights of the collaborative (auxiliary) losses; see the module docstring table."""

    atss: AtssWeights
    rpn: RpnWeights
    roi: RoiWeights
    aux_decoder: AuxDecoderWeights


def co_loss_weights(lambda1: float = 1.0, lambda2: float = 2.0, num_dec_layers: int = 6) -> CoLossWeights:
    """Effective weights: aux heads = base * num_dec_layers * lambda2; aux decoder = base * lambda1."""
    if lambda1 < 0 or lambda2 < 0:
        raise ValueError(f"lambda1 and lambda2 must be >= 0, got {lambda1}, {lambda2}")
    if num_dec_layers < 1:
        raise ValueError(f"num_dec_layers must be >= 1, got {num_dec_layers}")
    enc = num_dec_layers * lambda2
    return CoLossWeights(
        atss=AtssWeights(**{k: v * enc for k, v in ATSS_BASE.items()}),
        rpn=RpnWeights(**{k: v * enc for k, v in RPN_BASE.items()}),
        roi=RoiWeights(**{k: v * enc for k, v in ROI_BASE.items()}),
        aux_decoder=AuxDecoderWeights(**{k: v * lambda1 for k, v in AUX_DECODER_BASE.items()}),
    )
