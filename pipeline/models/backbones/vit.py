"""The authors' plain ViT backbone for Co-DINO ViT-L (Sense-X/Co-DETR `mmdet/models/backbones/vit.py`, `ViT`).

EVA-02-style ViT at patch 16 (the released `co_dino_5scale_vit_large_coco.py`; CO_DETR_SPEC.md 6):

- patch embedding: 16x16 stride-16 conv (timm `PatchEmbed`, NHWC out); an input side that is not a multiple
  of 16 loses its last pixels, as in the authors' conv (their data pipeline pads to a multiple of 32);
- absolute position embedding `pos_embed` (1, 1 + g * g, C) for the pretraining size (g = 512 / 16 = 32,
  position 0 is the class token's and is dropped), bicubic-resized (align_corners False, no antialias) to
  the token grid at every forward;
- `depth` `ViTBlock`s: window attention (window_size x window_size, zero-padded) except in `global_blocks`,
  rotary q/k (`rope.ViTRope`), SwiGLU + sub-LayerNorm, drop path linearly 0 -> drop_path_rate over depth;
- `out_norm`: nn.LayerNorm(C) with PyTorch's default eps 1e-5 (the blocks use 1e-6), as the authors;
- activation checkpointing per block (`checkpointing=True` or `set_checkpointing`), active only with grad.

forward(images (B, 3, H, W)) -> [ (B, C, H // 16, W // 16) ]: one stride-16 map, `out_channels` [C], `strides`
[16]; the SFP neck (`pipeline.models.necks.sfp`) makes the pyramid. State-dict names: the authors' except
inside the blocks (timm's EvaAttention / SwiGLU names), see `pipeline.checkpoints.vit_keys`.
Recipes: COCO window 24, global (3, 7, 11, 15, 19, 23), use_lsj False; LVIS window 16, global (2, 5, ..., 23),
use_lsj True with img_size 1536.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pipeline.models.backbones.rope import ViTRope
from pipeline.models.backbones.vit_block import ViTBlock

__all__ = ["ViT", "resize_abs_pos_embed"]

COCO_GLOBAL_BLOCKS = (3, 7, 11, 15, 19, 23)
LVIS_GLOBAL_BLOCKS = (2, 5, 8, 11, 14, 17, 20, 23)


def resize_abs_pos_embed(pos_embed: Tensor, hw: tuple[int, int], has_cls_token: bool = True) -> Tensor:
    """(1, [1 +] g * g, C) pretraining position embedding -> (1, h, w, C) for an h x w token grid.

    Bicubic, align_corners False, no antialias (the authors' `get_abs_pos`); identity when (h, w) == (g, g).
    """
    if has_cls_token:
        pos_embed = pos_embed[:, 1:]
    n, c = pos_embed.shape[1], pos_embed.shape[2]
    g = int(round(n**0.5))
    if g * g != n:
        raise ValueError(f"pos_embed must hold a square grid of positions, got {n} (cls token {has_cls_token})")
    grid = pos_embed.reshape(1, g, g, c)
    if (g, g) == tuple(hw):
        return grid
    out = F.interpolate(grid.permute(0, 3, 1, 2), size=hw, mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1)


class ViT(nn.Module):
    """The authors' ViT (defaults: ViT-L of the COCO recipe). See the module docstring for the computation.

    img_size: training input side; only used with use_lsj (fixed global rotary grid img_size // patch_size).
    pretrain_img_size: side the position embedding was trained at (grid pretrain_img_size // patch_size).
    window_size: window side in tokens for the blocks not in global_blocks (0: every block global).
    global_blocks: indices of the global-attention blocks.
    pt_hw_seq_len: rotary positions are rescaled to this grid (the authors' 16).
    """

    def __init__(
        self,
        img_size: int = 1536,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4 * 2 / 3,
        drop_path_rate: float = 0.0,
        window_size: int = 24,
        global_blocks: Sequence[int] = COCO_GLOBAL_BLOCKS,
        use_lsj: bool = False,
        pretrain_img_size: int = 512,
        pt_hw_seq_len: int = 16,
        checkpointing: bool = False,
    ):
        super().__init__()
        global_blocks = tuple(int(i) for i in global_blocks)
        if any(not 0 <= i < depth for i in global_blocks):
            raise ValueError(f"global_blocks {global_blocks} must be block indices in 0..{depth - 1}")
        if window_size < 0:
            raise ValueError(f"window_size must be >= 0 (0: global attention everywhere), got {window_size}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        if use_lsj and img_size % patch_size:
            raise ValueError(f"use_lsj needs img_size a multiple of patch_size {patch_size}, got {img_size}")
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.depth = depth
        self.global_blocks = global_blocks
        self.window_size = window_size
        self.checkpointing = checkpointing
        self.out_channels = [embed_dim]
        self.strides = [patch_size]

        self.patch_embed = PatchEmbed(
            img_size=None, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, output_fmt="NHWC",
            strict_img_size=False,
        )  # fmt: skip
        grid = pretrain_img_size // patch_size
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        self.rope = ViTRope(
            head_dim=embed_dim // num_heads, window_size=window_size, pt_seq_len=pt_hw_seq_len,
            lsj_grid=img_size // patch_size if use_lsj else None,
        )  # fmt: skip
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        self.blocks = nn.ModuleList(
            ViTBlock(embed_dim, num_heads, mlp_ratio, 0 if i in global_blocks else window_size, dpr[i])
            for i in range(depth)
        )
        self.out_norm = nn.LayerNorm(embed_dim)  # default eps 1e-5, as the authors
        self.init_weights()

    def init_weights(self) -> None:
        """The authors' from-scratch init: pos_embed and Linear weights trunc-normal(0.02), biases 0, LN 1 / 0."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def set_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of every block (recompute in backward; memory only)."""
        self.checkpointing = enable

    def forward(self, images: Tensor) -> list[Tensor]:
        if images.ndim != 4 or images.shape[-2] < self.patch_size or images.shape[-1] < self.patch_size:
            raise ValueError(
                f"ViT expects images (B, C, H, W) with H, W >= {self.patch_size}, got {tuple(images.shape)}"
            )
        x = self.patch_embed(images)  # (B, H/16, W/16, C)
        H, W = x.shape[1], x.shape[2]
        x = x + resize_abs_pos_embed(self.pos_embed, (H, W))
        has_window = self.window_size > 0 and len(self.global_blocks) < self.depth
        rope_win = self.rope.window(x.device) if has_window else None
        rope_glb = self.rope.global_(H, W, x.device) if self.global_blocks or self.window_size == 0 else None
        for i, blk in enumerate(self.blocks):
            rope = rope_glb if i in self.global_blocks or self.window_size == 0 else rope_win
            if self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, rope, use_reentrant=False)
            else:
                x = blk(x, rope)
        return [self.out_norm(x).permute(0, 3, 1, 2).contiguous()]  # (B, C, H/16, W/16)
