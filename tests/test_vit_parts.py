"""Small checks of the ViT pieces the golden fixture does not reach: checkpointing, use_lsj, window padding."""

from __future__ import annotations

import pytest
import torch

from pipeline.models.backbones.rope import rope_table
from pipeline.models.backbones.vit import ViT
from pipeline.models.backbones.vit_block import window_partition, window_unpartition


def _tiny(**kw: object) -> ViT:
    torch.manual_seed(0)
    return ViT(**{"depth": 2, "embed_dim": 128, "num_heads": 2, "window_size": 3, "global_blocks": (1,), **kw})


def test_checkpointing_gives_the_same_loss_and_grads() -> None:
    model = _tiny(drop_path_rate=0.0)
    x = torch.randn(2, 3, 80, 112)  # 5 x 7 tokens: windows of 3 padded to 6 x 9
    grads = []
    for ckpt in (False, True):
        model.set_checkpointing(ckpt)
        model.zero_grad()
        (feat,) = model(x)
        assert feat.shape == (2, 128, 5, 7)
        feat.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_window_padding_roundtrip_and_lsj_grid() -> None:
    x = torch.randn(2, 5, 7, 4)
    windows, pad_hw = window_partition(x, 3)
    assert windows.shape == (2 * 2 * 3, 3, 3, 4) and pad_hw == (6, 9)
    assert windows[-1, 2].abs().sum() == 0  # the padded bottom row of the last window is zeros
    assert torch.equal(window_unpartition(windows, 3, pad_hw, (5, 7)), x)

    lsj = _tiny(use_lsj=True, img_size=96).eval()  # fixed 6 x 6 global rotary grid
    with torch.no_grad():
        (feat,) = lsj(torch.randn(1, 3, 96, 96))
    assert feat.shape == (1, 128, 6, 6)
    with pytest.raises(ValueError, match="fixed 6x6 global rotary grid.*5x7"):
        lsj(torch.randn(1, 3, 80, 112))
    assert rope_table(6, 6, 64).shape == (36, 128)
