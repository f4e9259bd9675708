"""Contract shared by the collaborative auxiliary heads (ATSS, Faster R-CNN, RetinaNet, FCOS, GFL, ...).

Every auxiliary head trains on the 6 multi-scale adapter maps and exports its positive (and negative)
coordinates so that the query head can build customized positive queries (CO_DETR_SPEC.md 2.2, 2.3, 3.1).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


@dataclass
class AuxPositives:
    """Coordinates exported by one auxiliary head, one list entry per image.

    head: tag of the exporting head, "atss" or "rcnn" (the authors' tags) / "faster_rcnn".
    coords: list of B tensors (M_i, 4) xyxy in pixels of the network input (anchors or RoIs).
    labels: list of B tensors (M_i,) long, class in [0, nc) for positives, nc = background.
    targets: list of B tensors (M_i, 4) xyxy in pixels, the assigned GT box (unused for negatives).
    feats: list of B tensors (M_i, C) or None (Co-Deformable's coordinate features; None for Co-DINO).
    """

    head: str
    coords: list[Tensor]
    labels: list[Tensor]
    targets: list[Tensor]
    feats: list[Tensor] | None = None


class AuxHead(nn.Module):
    """Protocol of an auxiliary head.

    Subclasses set `name` and implement `forward_train`:
      feats: list of the 6 adapter maps (B, 256, h_l, w_l), strides 4, 8, 16, 32, 64, 128.
      targets: list of B dicts with `boxes (N, 4)` cxcywh normalised by the unpadded size (h, w),
        `labels (N,)` int64 in [0, nc), `size (2,)` (h, w).
      img_sizes: (B, 2) long (h, w) of the unpadded network input.
    Returns (losses, positives): losses are UNWEIGHTED terms named by the head's row of the table
    (pipeline/models/aux_heads/table.py, with the head's group index k as suffix); `loss_weights.weigh` applies
    base x num_dec_layers_factor x lambda2 once. Keys without "loss" are metrics (e.g. `acc0`).
    A head is registered by a row of the table and built by its module's `build(cfg, ctx)`.
    """

    name: str = "aux"

    def forward_train(
        self, feats: list[Tensor], targets: list[dict[str, Tensor]], img_sizes: Tensor
    ) -> tuple[dict[str, Tensor], AuxPositives]:
        raise NotImplementedError(f"{type(self).__name__} must implement forward_train")
