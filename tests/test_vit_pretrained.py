"""EVA-02 pretrained weights (timm names, or EVA's original names) -> our ViT, as the authors' init_weights.

No download here: timm EVA-02 models with random weights stand in for the checkpoints (key names and shapes are
what matter; numbers are checked on a narrow 2-block copy).
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from pipeline.models.backbones.vit import ViT
from pipeline.models.backbones.vit_pretrained import eva02_to_vit, load_eva02_pretrained

EVA_ORIGINAL = (("attn.q_proj.bias", "attn.q_bias"), ("attn.v_proj.bias", "attn.v_bias"), ("mlp.fc1_g.", "mlp.w1."),
                ("mlp.fc1_x.", "mlp.w2."), ("mlp.norm.", "mlp.ffn_ln."), ("mlp.fc2.", "mlp.w3."))  # fmt: skip


def _to_eva_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm names -> EVA's own (= the authors') names under `backbone.`, plus a rotary table, wrapped."""
    out = {}
    for k, v in sd.items():
        for timm_leaf, eva_leaf in EVA_ORIGINAL:
            k = k.replace(timm_leaf, eva_leaf)
        out["backbone." + k] = v
    out["backbone.rope.freqs_cos"] = torch.zeros(1, device=sd["pos_embed"].device)
    return {"model": out}


@pytest.mark.parametrize(
    "name, pos_resized",
    [("eva02_large_patch14_448.mim_m38m_ft_in22k_in1k", False), ("eva02_large_patch14_224.mim_m38m", True)],
)
def test_eva02_large_names_fit_our_vit_l(name: str, pos_resized: bool) -> None:
    """Every EVA-02 L key maps onto ViT-L (meta device): patch 14 -> 16, positions to 32x32; report complete."""
    with torch.device("meta"):
        sd = timm.create_model(name, pretrained=False).state_dict()
        model = ViT()
    for state in (sd, _to_eva_original(sd)):
        mapped, report = eva02_to_vit(state, model)
        assert report.missing == ["out_norm.weight", "out_norm.bias"]
        assert sorted(mapped) == sorted(k for k in model.state_dict() if not k.startswith("out_norm."))
        assert {k.removeprefix("backbone.") for k in report.dropped} >= {"cls_token", "fc_norm.weight"}
        assert all(not k.removeprefix("backbone.").startswith("blocks.") for k in report.dropped)
        assert report.resized["patch_embed.proj.weight"] == ((1024, 3, 14, 14), (1024, 3, 16, 16))
        assert ("pos_embed" in report.resized) == pos_resized
        assert mapped["pos_embed"].shape == (1, 1 + 32 * 32, 1024)


def test_eva02_weights_give_timms_features_and_the_authors_resizes() -> None:
    """A narrow 2-block EVA-02 (random weights): at patch 14 with global attention our ViT computes timm's
    features (rotary, SwiGLU, q/v biases mapped right); at patch 16 the kernel is the bicubic resize."""
    torch.manual_seed(0)
    kw = dict(depth=2, embed_dim=128, num_heads=2)
    tm = timm.create_model("eva02_large_patch14_448", pretrained=False, class_token=False, **kw).eval()
    sd = {k: v + 0.02 * torch.randn_like(v) for k, v in tm.state_dict().items()}  # non-zero biases
    tm.load_state_dict(sd)
    sd["pos_embed"] = torch.cat([torch.zeros(1, 1, 128), sd["pos_embed"]], dim=1)  # a class position, dropped

    ours = ViT(patch_size=14, pretrain_img_size=448, window_size=0, global_blocks=(), **kw).eval()
    report = load_eva02_pretrained(ours, sd)
    assert report.missing == ["out_norm.weight", "out_norm.bias"] and not report.resized
    x = torch.randn(1, 3, 448, 448)
    with torch.no_grad():
        ref = tm.forward_features(x)  # (1, 32 * 32, C), no class token, norm = Identity
        (feat,) = ours(x)  # (1, C, 32, 32) after out_norm (weight 1, bias 0, eps 1e-5)
    ref = F.layer_norm(ref, (128,), eps=1e-5).transpose(1, 2).reshape(1, 128, 32, 32)
    assert (feat - ref).abs().max().item() < 1e-4

    ours16 = ViT(patch_size=16, pretrain_img_size=512, window_size=8, global_blocks=(1,), **kw)
    report = load_eva02_pretrained(ours16, sd)
    assert report.resized == {"patch_embed.proj.weight": ((128, 3, 14, 14), (128, 3, 16, 16))}
    want = F.interpolate(sd["patch_embed.proj.weight"], size=(16, 16), mode="bicubic", align_corners=False)
    assert torch.equal(ours16.patch_embed.proj.weight.detach(), want)
    assert torch.equal(ours16.blocks[1].attn.v_proj.bias.detach(), sd["blocks.1.attn.v_proj.bias"])
    assert torch.equal(ours16.blocks[0].mlp.fc1_g.weight.detach(), sd["blocks.0.mlp.fc1_g.weight"])


def test_unknown_key_or_wrong_shape_raises() -> None:
    with torch.device("meta"):
        model = ViT(depth=2, embed_dim=128, num_heads=2, global_blocks=(1,))
        sd = {k: torch.empty(v.shape) for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="unknown keys.*blocks.5"):
        eva02_to_vit({**sd, "blocks.5.norm1.weight": torch.empty(128, device="meta")}, model)
    with pytest.raises(ValueError, match="shape mismatch.*blocks.0.norm1.weight"):
        eva02_to_vit({**sd, "blocks.0.norm1.weight": torch.empty(64, device="meta")}, model)
