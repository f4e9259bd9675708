"""Per-image ground truths padded into batch tensors, so that assigners and samplers run once per batch."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence


def pad_gts(boxes: Sequence[Tensor], labels: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Per image (G_i, 4) boxes and (G_i,) labels -> (B, G, 4) boxes (zeros past G_i), (B, G) long labels
    (0 past G_i), (B, G) bool valid mask (the first G_i of row i); G = max(max_i G_i, 1): at least one (invalid)
    column, so that gathers by assigned GT index work for a batch without any GT."""
    if len(boxes) != len(labels) or not boxes:
        raise ValueError(f"pad_gts needs one label tensor per box tensor and >= 1 image, got {len(boxes)}, "
                         f"{len(labels)}")  # fmt: skip
    counts = torch.tensor([b.shape[0] for b in boxes], device=boxes[0].device)
    padded = pad_sequence([b.reshape(-1, 4) for b in boxes], batch_first=True)  # (B, G, 4)
    lab = pad_sequence([lb.reshape(-1).long() for lb in labels], batch_first=True)  # (B, G)
    if padded.shape[1] == 0:
        padded, lab = padded.new_zeros((len(boxes), 1, 4)), lab.new_zeros((len(boxes), 1))
    valid = torch.arange(padded.shape[1], device=padded.device)[None] < counts[:, None]
    return padded, lab, valid
