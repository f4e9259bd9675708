"""Customized positive queries of Co-DETR (CO_DETR_SPEC.md 3.1, 3.2, 3.4), Co-DINO flavour.

1. `build_aux_groups`: the coordinates an auxiliary head exported (AuxPositives) become one fixed-size group per
   batch: M = clamp(max #positives over the batch, min_pos, max_pos) queries per image, all positives kept (a
   random subset of M if more), padded with randomly chosen negatives of the same head; normalised cxcywh.
2. `AuxQueryProjection`: content query = LayerNorm(Linear_{2C->C}(sine(inverse_sigmoid(box)))) per head
   (`aux_pos_trans.{i}`, `aux_pos_trans_norm.{i}`); the reference box is the group box itself.
3. `aux_decoder_losses`: no matching; QFL (score = IoU of the detached prediction with its target on positives),
   L1 on normalised cxcywh and GIoU on pixel xyxy, for every decoder layer, UNWEIGHTED (the model weighs them
   with loss_weights.weigh: the one-to-one weights x lambda1). Co-Deformable
   (`cls_loss="focal"`): sigmoid focal loss (alpha 0.25, gamma 2) with the label weights instead of QFL.
The Co-Deformable projection (with the coordinate-feature term) is `co_deformable.DeformableAuxQueryProjection`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from pipeline.models.aux_heads.base import AuxPositives
from pipeline.models.box_ops import aligned_iou, box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid
from pipeline.models.layers.position_encoding import get_proposal_pos_embed
from pipeline.models.loss_weights import AuxDecoderWeights, weigh
from pipeline.models.losses import (
    giou_loss,
    l1_loss,
    quality_focal_loss,
    reduce_mean,
    sigmoid_focal_loss,
    weight_reduce_loss,
)


@dataclass
class AuxGroup:
    """One head's customized queries for the batch (M = group size, the same for every image).

    boxes: (B, M, 4) cxcywh normalised by the unpadded size (h, w), not clamped (anchors may exceed [0, 1]).
    labels: (B, M) long, class for positives, nc = background.
    targets: (B, M, 4) cxcywh normalised, the assigned GT (meaningful where box_weights = 1).
    label_weights: (B, M) float, 1 for real slots (positives and sampled negatives), 0 for filler slots.
    box_weights: (B, M) float, 1 on positives only.
    feats: (B, M, C) or None (Co-Deformable's coordinate features).
    head: tag of the source head.
    """

    boxes: Tensor
    labels: Tensor
    targets: Tensor
    label_weights: Tensor
    box_weights: Tensor
    head: str
    feats: Tensor | None = None


def _rand(shape: tuple[int, int], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Uniform [0, 1) keys: from `generator` (CPU) when given, else drawn on `device`."""
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator).to(device)


def build_aux_groups(
    positives: AuxPositives,
    img_sizes: Tensor,
    num_classes: int,
    min_pos: int = 9,
    max_pos: int = 300,
    generator: torch.Generator | None = None,
) -> AuxGroup:
    """AuxPositives (per image (M_i, 4) xyxy pixels) -> AuxGroup of M = clamp(max_b #pos_b, min_pos, max_pos).

    img_sizes: (B, 2) (h, w) of the unpadded network input. `generator` (CPU) makes the random subsets
    reproducible. Per image: all positives (ascending index; a random subset of M in random order if more), then
    randomly chosen distinct negatives. Deviation from the authors (who would crash): if an image has fewer
    negatives than slots to fill, negatives are drawn again with replacement, and with no negatives at all the
    rest is filled with zero boxes of label bg and label weight 0.

    Vectorised over the batch (images of equal M_i, as every head exports; unequal ones are padded with slots that
    are neither positive nor negative): one top-k of random keys picks the slots of every image at once.
    """
    coords, labels, targets = positives.coords, positives.labels, positives.targets
    b = len(coords)
    if img_sizes.shape[0] != b:
        raise ValueError(f"img_sizes has {img_sizes.shape[0]} rows for {b} images of head {positives.head!r}")
    device = coords[0].device if b else img_sizes.device
    feats = positives.feats
    if b and all(c.shape[0] == coords[0].shape[0] for c in coords):
        coords_t, labels_t, targets_t = torch.stack(coords), torch.stack(labels), torch.stack(targets)
        feats_t = torch.stack(list(feats)) if feats is not None else None
    else:  # unequal lengths: pad with label -1 (neither positive nor negative)
        coords_t, targets_t = (pad_sequence(list(t), batch_first=True) for t in (coords, targets))
        labels_t = pad_sequence([lab.long() for lab in labels], batch_first=True, padding_value=-1)
        feats_t = pad_sequence(list(feats), batch_first=True) if feats is not None else None
    n = labels_t.shape[1]
    is_pos = (labels_t >= 0) & (labels_t < num_classes)  # (B, N)
    is_neg = labels_t == num_classes
    n_pos, n_neg = is_pos.sum(1), is_neg.sum(1)  # (B,)
    m = max(min_pos, min(max_pos, int(n_pos.max()) if b else 0))

    # one key per entry: positives first (ascending index when all fit, random order otherwise), then negatives
    # in random order, then everything else; the first M entries of each row are the group
    rand = _rand((b, n), generator, device)
    ascending = 1.0 - torch.arange(n, device=device, dtype=torch.float32) / max(n, 1)  # in (0, 1]
    pos_key = torch.where((n_pos > m)[:, None], rand, ascending[None]) + 2.0
    key = torch.where(is_pos, pos_key, torch.where(is_neg, rand, rand.new_tensor(-1.0)))
    order = key.topk(min(m, n), dim=1).indices  # (B, min(M, N)), descending keys; extra slots fall in it too
    kept_pos = n_pos.clamp(max=m)  # (B,)
    real = (kept_pos + n_neg).clamp(max=m)  # distinct entries per row
    slot = torch.arange(m, device=device)[None].expand(b, m)  # (B, M)
    # with too few negatives, the slots past them repeat random negatives (with replacement)
    extra = kept_pos[:, None] + (_rand((b, m), generator, device) * n_neg[:, None]).long()
    src = torch.where(slot < real[:, None], slot, torch.where((n_neg > 0)[:, None], extra, slot))
    filled = (slot < real[:, None]) | (n_neg > 0)[:, None]  # False: an empty slot (no negative to repeat)
    idx = order.gather(1, src.clamp(max=order.shape[1] - 1)) if n else slot.new_zeros((b, m))  # (B, M) entries

    factor = img_sizes.to(device=device, dtype=coords_t.dtype).flip(1).repeat(1, 2)[:, None]  # (B, 1, 4) w h w h
    idx4 = idx[..., None].expand(-1, -1, 4)
    box = box_xyxy_to_cxcywh(coords_t.gather(1, idx4) / factor) if n else coords_t.new_zeros((b, m, 4))
    tgt = box_xyxy_to_cxcywh(targets_t.gather(1, idx4) / factor) if n else targets_t.new_zeros((b, m, 4))
    lab = labels_t.gather(1, idx) if n else labels_t.new_full((b, m), num_classes)
    zero = box.new_zeros(())
    box = torch.where(filled[..., None], box, zero)
    tgt = torch.where(filled[..., None], tgt, zero)
    lab = torch.where(filled, lab.long(), num_classes)
    lw = filled.to(box.dtype)
    bw = (slot < kept_pos[:, None]).to(box.dtype)
    feat = None
    if feats_t is not None:
        feat = feats_t.gather(1, idx[..., None].expand(-1, -1, feats_t.shape[-1])) if n else (
            feats_t.new_zeros((b, m, feats_t.shape[-1])))  # fmt: skip
        feat = torch.where(filled[..., None], feat, feat.new_zeros(()))
    return AuxGroup(boxes=box, labels=lab, targets=tgt, label_weights=lw, box_weights=bw, head=positives.head,
                    feats=feat)  # fmt: skip


class AuxQueryProjection(nn.Module):
    """Co-DINO content queries of the aux groups: q = LN_C(Linear_{2C->C}^{(head)}(PE(inverse_sigmoid(box)))).

    PE = get_proposal_pos_embed: sigmoid, x 2 pi, C/2 frequencies per coordinate (temperature 10000), sin/cos
    interleaved, order cx, cy, w, h -> 2C. Keys `aux_pos_trans.{i}.*`, `aux_pos_trans_norm.{i}.*` (authors'
    `query_head.transformer.` prefix). Init: the authors' transformer init (Xavier-uniform weights, default bias).
    forward(boxes (B, M, 4) normalised cxcywh, head_idx) -> (B, M, C).
    """

    def __init__(self, num_heads: int = 2, embed_dims: int = 256) -> None:
        super().__init__()
        if embed_dims % 2:
            raise ValueError(f"embed_dims must be even, got {embed_dims}")
        self.embed_dims = embed_dims
        self.aux_pos_trans = nn.ModuleList([nn.Linear(2 * embed_dims, embed_dims) for _ in range(num_heads)])
        self.aux_pos_trans_norm = nn.ModuleList([nn.LayerNorm(embed_dims) for _ in range(num_heads)])
        for lin in self.aux_pos_trans:
            nn.init.xavier_uniform_(lin.weight)

    def forward(self, boxes: Tensor, head_idx: int) -> Tensor:
        if not 0 <= head_idx < len(self.aux_pos_trans):
            raise ValueError(f"head_idx {head_idx} out of range for {len(self.aux_pos_trans)} aux heads")
        pe = get_proposal_pos_embed(inverse_sigmoid(boxes), num_feats=self.embed_dims // 2)  # (B, M, 2C)
        return self.aux_pos_trans_norm[head_idx](self.aux_pos_trans[head_idx](pe))

    def queries(self, group: AuxGroup, head_idx: int) -> tuple[Tensor, Tensor | None]:
        """(content query (B, M, C), None): Co-DINO's positional query is recomputed per decoder layer."""
        return self(group.boxes, head_idx), None


@dataclass
class _GroupTargets:
    """Per-group loss inputs shared by every decoder layer (computed once: same labels and targets each layer).

    labels (N,), label_w (N,), box_w4 (N, 4), targets (N, 4) normalised cxcywh, pos (N,) bool, targets_xyxy (N, 4)
    normalised xyxy of the targets (the whole image off the positives), targets_px (N, 4) pixel xyxy; cls_avg
    (tensor) and box_avg (float) = max(reduce_mean(#pos), 1); N = B * M.
    """

    labels: Tensor
    label_w: Tensor
    box_w4: Tensor
    targets: Tensor
    pos: Tensor
    targets_xyxy: Tensor
    targets_px: Tensor
    cls_avg: Tensor
    box_avg: Tensor


def _group_targets(group: AuxGroup, factors: Tensor, num_classes: int) -> _GroupTargets:
    """float32 loss targets of a group; factors (N, 4) float32 (w, h, w, h) per query."""
    labels = group.labels.reshape(-1)
    targets = group.targets.reshape(-1, 4).float()
    pos = (labels >= 0) & (labels < num_classes)
    avg = reduce_mean(pos.sum().to(torch.float32)).clamp(min=1)  # one all-reduce for both normalisers, on device
    return _GroupTargets(
        labels=labels,
        label_w=group.label_weights.reshape(-1).float(),
        box_w4=group.box_weights.reshape(-1).float()[:, None].expand(-1, 4),
        targets=targets,
        pos=pos,
        targets_xyxy=box_cxcywh_to_xyxy(torch.where(pos[:, None], targets, targets.new_tensor([0.5, 0.5, 1.0, 1.0]))),
        targets_px=box_cxcywh_to_xyxy(targets) * factors,
        cls_avg=avg,
        box_avg=avg,
    )


def _layer_losses(
    logits: Tensor,
    boxes: Tensor,
    t: _GroupTargets,
    factors: Tensor,
    num_classes: int,
    focal: tuple[float, float] | None = None,
    qfl_beta: float = 2.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """One decoder layer: logits (B, M, nc), boxes (B, M, 4) normalised cxcywh, float32 -> unweighted
    (QFL, L1, GIoU); focal = (alpha, gamma) uses the sigmoid focal loss instead of QFL."""
    logits = logits.reshape(-1, num_classes)
    boxes = boxes.reshape(-1, 4)
    if focal is not None:
        loss_cls = sigmoid_focal_loss(logits, t.labels, t.label_w, t.cls_avg, alpha=focal[0], gamma=focal[1])
    else:
        # IoU of every query with its target (a stand-in off the positives), kept on the positives: fixed shapes
        scores = aligned_iou(box_cxcywh_to_xyxy(boxes.detach()), t.targets_xyxy) * t.pos
        qfl = quality_focal_loss(logits, t.labels, scores, beta=qfl_beta)
        loss_cls = weight_reduce_loss(qfl, t.label_w, "mean", t.cls_avg)
    pred_px = box_cxcywh_to_xyxy(boxes) * factors
    loss_iou = giou_loss(pred_px, t.targets_px, weight=t.box_w4, avg_factor=t.box_avg)
    loss_l1 = l1_loss(boxes, t.targets, weight=t.box_w4, avg_factor=t.box_avg)
    return loss_cls, loss_l1, loss_iou


def aux_decoder_losses(
    cls_logits: Tensor,
    boxes: Tensor,
    group: AuxGroup,
    img_sizes: Tensor,
    weights: AuxDecoderWeights | None = None,
    head_index: int = 0,
    focal: tuple[float, float] | None = None,
    qfl_beta: float = 2.0,
) -> dict[str, Tensor]:
    """Losses of one aux group over all decoder layers (authors' `loss_single_aux`).

    cls_logits: (L, B, M, nc); boxes: (L, B, M, 4) sigmoid cxcywh normalised by the unpadded size; img_sizes:
    (B, 2) (h, w). weights: None = unweighted terms (the model's path: CoDETR weighs all aux terms at once),
    else effective weights applied with `loss_weights.weigh`. Keys: last layer `loss_{cls,bbox,iou}_aux{k}`,
    others `d{l}.loss_{cls,bbox,iou}_aux{k}` (k = head_index, group order RoI heads first). focal: (alpha, gamma)
    of the sigmoid focal loss replacing QFL (Co-Deformable); qfl_beta: the QFL exponent (LossConfig.qfl_beta).
    """
    num_layers, b, m, nc = cls_logits.shape
    if boxes.shape[:3] != (num_layers, b, m) or group.labels.shape != (b, m):
        raise ValueError(
            f"aux outputs {tuple(cls_logits.shape)} / {tuple(boxes.shape)} do not fit the group "
            f"{tuple(group.labels.shape)}"
        )
    hw = img_sizes.to(device=boxes.device, dtype=boxes.dtype)
    factors = torch.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], dim=1)  # (B, 4) w, h, w, h
    factors = factors[:, None, :].expand(b, m, 4).reshape(-1, 4).float()
    targets = _group_targets(group, factors, nc)
    out: dict[str, Tensor] = {}
    for layer in range(num_layers):
        lc, lb, li = _layer_losses(cls_logits[layer].float(), boxes[layer].float(), targets, factors, nc, focal,
                                   qfl_beta)  # fmt: skip
        prefix = "" if layer == num_layers - 1 else f"d{layer}."
        out[f"{prefix}loss_cls_aux{head_index}"] = lc
        out[f"{prefix}loss_bbox_aux{head_index}"] = lb
        out[f"{prefix}loss_iou_aux{head_index}"] = li
    return out if weights is None else weigh(out, weights.keys(head_index, num_layers))
