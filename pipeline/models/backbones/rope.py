"""Rotary position tables of the authors' ViT-L (Sense-X/Co-DETR `mmdet/models/backbones/vit.py`).

The authors rotate q and k of every attention block with an axial 2-D rotary embedding over the whole head
(head_dim 64 = 32 dims for the row index + 32 for the column index, 16 frequencies 10000^(-i/16) each, every
frequency used by a pair of adjacent channels: the interleaved layout). Token positions are rescaled to the
pretraining grid `pt_seq_len` (16): position p of an axis of length n is p / n * 16.

- Window blocks (`rope_win`): a fixed table for the window_size x window_size window.
- Global blocks: with `use_lsj` off, `get_rope(q, H, W)` builds the table from the actual token grid at every
  forward; with `use_lsj` on, `rope_glb` is a fixed table for img_size / patch_size squared (the LSJ input is
  always padded to img_size, so the grid never changes; any other grid is an error here).

The tables are computed, never loaded: the authors' checkpoints carry them as `*.rope_*.freqs_cos/freqs_sin`
buffers, which `pipeline.checkpoints.vit_keys` drops. Tables are built by timm's `build_rotary_pos_embed`
(`in_pixels=False`, `ref_feat_shape=(16, 16)`), which is bit-identical to the authors' formula (checked on
24x24, 28x40, 96x96 and 7x13 grids), and applied by timm's `EvaAttention` (`apply_rot_embed_cat`, interleaved
`rot`), which is the authors' `t * cos + rotate_half(t) * sin`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import build_rotary_pos_embed
from torch import Tensor

__all__ = ["ViTRope", "rope_table"]


def rope_table(h: int, w: int, head_dim: int, pt_seq_len: int = 16, device: torch.device | None = None) -> Tensor:
    """Rotary table for an h x w token grid, rows first: (h * w, 2 * head_dim) = cat([sin, cos], -1).

    Each of sin / cos is (h * w, head_dim): the first head_dim / 2 channels rotate by the row position
    (p / h * pt_seq_len), the last head_dim / 2 by the column position, adjacent channel pairs share a frequency.
    """
    if head_dim % 4:
        raise ValueError(f"rotary head_dim must be a multiple of 4 (2 axes x channel pairs), got {head_dim}")
    sin, cos = build_rotary_pos_embed(
        [h, w], dim=head_dim, in_pixels=False, ref_feat_shape=[pt_seq_len, pt_seq_len], device=device
    )
    return torch.cat([sin, cos], dim=-1)


@dataclass(frozen=True)
class ViTRope:
    """Which table each block uses. No parameters or buffers: tables are cheap and built per forward.

    head_dim: channels per attention head (64 for ViT-L).
    window_size: side of the attention windows in tokens (0: no window blocks).
    pt_seq_len: the pretraining grid the positions are rescaled to (the authors' `pt_hw_seq_len`, 16).
    lsj_grid: with `use_lsj`, the fixed global grid side img_size // patch_size; None: the actual grid.
    """

    head_dim: int
    window_size: int
    pt_seq_len: int = 16
    lsj_grid: int | None = None

    def window(self, device: torch.device) -> Tensor:
        """(window_size ** 2, 2 * head_dim) table shared by every window block."""
        return rope_table(self.window_size, self.window_size, self.head_dim, self.pt_seq_len, device)

    def global_(self, h: int, w: int, device: torch.device) -> Tensor:
        """(h * w, 2 * head_dim) table of the global blocks for an h x w token grid."""
        if self.lsj_grid is not None:
            if (h, w) != (self.lsj_grid, self.lsj_grid):
                raise ValueError(
                    f"use_lsj ViT has a fixed {self.lsj_grid}x{self.lsj_grid} global rotary grid (img_size / patch), "
                    f"got a {h}x{w} token grid: pad the input to img_size or turn use_lsj off"
                )
            h = w = self.lsj_grid
        return rope_table(h, w, self.head_dim, self.pt_seq_len, device)
