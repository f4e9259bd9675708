"""One block of the authors' ViT-L: (window or global) rotary attention + SwiGLU MLP, pre-norm residuals.

As `Block` in Sense-X/Co-DETR `mmdet/models/backbones/vit.py`:

    x = x + drop_path(attn(window_partition(norm1(x))))     # windows unpartitioned and cropped after attn
    x = x + drop_path(mlp(norm2(x)))

- Window blocks split the (H, W) token grid into window_size x window_size windows after `norm1`, padding the
  grid bottom/right with zeros; padded tokens attend and are attended like the others (no mask), then are cut.
- Attention is timm's `EvaAttention` (separate q/k/v projections, biases on q and v only, rotary on q and k,
  no prefix tokens, no inner norm) forced onto `F.scaled_dot_product_attention` (scale head_dim ** -0.5).
  The authors keep the q/v biases as `attn.q_bias` / `attn.v_bias`; here they are `attn.q_proj.bias` /
  `attn.v_proj.bias` (timm names; `pipeline.checkpoints.vit_keys` maps them).
- MLP is timm's `SwiGLU` with a sub-LayerNorm: fc2(norm(silu(fc1_g(x)) * fc1_x(x))) = the authors'
  w3(ffn_ln(silu(w1(x)) * w2(x))), hidden int(dim * 8 / 3) (2730 for dim 1024). LayerNorm eps 1e-6.
"""

from __future__ import annotations

from functools import partial

import torch.nn.functional as F
from timm.layers import DropPath, SwiGLU
from timm.models.eva import EvaAttention
from torch import Tensor, nn

__all__ = ["ViTBlock", "window_partition", "window_unpartition"]


def window_partition(x: Tensor, window_size: int) -> tuple[Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B * nH * nW, ws, ws, C) windows of the grid zero-padded to (Hp, Wp), and (Hp, Wp)."""
    B, H, W, C = x.shape
    pad_h = (window_size - H % window_size) % window_size
    pad_w = (window_size - W % window_size) % window_size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    x = x.view(B, Hp // window_size, window_size, Wp // window_size, window_size, C)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, C)
    return windows, (Hp, Wp)


def window_unpartition(windows: Tensor, window_size: int, pad_hw: tuple[int, int], hw: tuple[int, int]) -> Tensor:
    """Inverse of `window_partition`: (B * nH * nW, ws, ws, C) -> (B, H, W, C), padding cut off."""
    Hp, Wp = pad_hw
    H, W = hw
    B = windows.shape[0] // (Hp * Wp // window_size // window_size)
    x = windows.view(B, Hp // window_size, Wp // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, -1)
    if Hp > H or Wp > W:
        x = x[:, :H, :W, :].contiguous()
    return x


class ViTBlock(nn.Module):
    """forward(x (B, H, W, C), rope (n * n or H * W, 2 * head_dim)) -> (B, H, W, C).

    window_size > 0: attention inside window_size x window_size windows, `rope` the window table;
    window_size == 0: global attention over H x W, `rope` the table of that grid.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4 * 2 / 3,
        window_size: int = 0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.window_size = window_size
        self.norm1 = norm_layer(dim)
        self.attn = EvaAttention(
            dim, num_heads=num_heads, qkv_bias=True, qkv_fused=False, num_prefix_tokens=0, norm_layer=None,
            scale_norm=False,
        )  # fmt: skip
        # always F.scaled_dot_product_attention (timm's default follows TIMM_FUSED_ATTN); timm types it Final
        self.attn.fused_attn = True  # type: ignore[misc]
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = SwiGLU(dim, int(dim * mlp_ratio), norm_layer=norm_layer)  # type: ignore[arg-type]  # a partial

    def forward(self, x: Tensor, rope: Tensor) -> Tensor:
        shortcut = x
        x = self.norm1(x)
        B, H, W, C = x.shape
        pad_hw = (H, W)
        if self.window_size > 0:
            x, pad_hw = window_partition(x, self.window_size)  # (B * nW, ws, ws, C)
        b, h, w, _ = x.shape
        x = self.attn(x.reshape(b, h * w, C), rope=rope).view(b, h, w, C)
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, pad_hw, (H, W))
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))
