"""Backbones (timm ResNet / Swin / ViT + SFP), FrozenBatchNorm, weight loading and the ChannelMapper neck.

.venv/bin/python -m pytest tests/test_backbone.py -q
"""

from __future__ import annotations

import importlib.util
import io
import math
import os
from dataclasses import dataclass, replace

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from pipeline import storage
from pipeline.models.backbones.frozen_bn import convert_frozen_batchnorm
from pipeline.models.backbones.timm_backbones import build_backbone
from pipeline.models.necks.channel_mapper import ChannelMapper, SimpleFeaturePyramid, build_neck

GOLDEN = os.environ.get("CODETR_GOLDEN_DIR", "/work/shared/golden/co_dino_r50")
TINY_SWIN = dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))
TINY_VIT = dict(embed_dim=64, depth=2, num_heads=2)


@dataclass(frozen=True)
class Cfg:  # same fields as pipeline.models.config.BackboneConfig
    name: str = "resnet50"
    out_indices: tuple[int, ...] = (0, 1, 2, 3)
    frozen_stages: int = 1
    norm: str = "frozen_bn"
    pretrained: bool = False
    weights: str | None = None
    checkpointing: bool = False
    drop_path_rate: float = 0.0


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _images(h: int = 64, w: int = 96) -> torch.Tensor:
    return torch.randn(2, 3, h, w)


def _shapes(maps: list[torch.Tensor]) -> list[tuple[int, ...]]:
    return [tuple(m.shape) for m in maps]


def test_resnet50_channels_strides_and_names():
    bb = build_backbone(Cfg())
    assert bb.out_channels == [256, 512, 1024, 2048] and bb.strides == [4, 8, 16, 32]
    names = dict(bb.state_dict())
    for key in (
        "body.conv1.weight",
        "body.layer1.0.conv1.weight",
        "body.bn1.weight",
        "body.bn1.running_mean",
        "body.bn1.running_var",
        "body.layer4.2.bn3.bias",
        "body.layer1.0.downsample.1.running_var",
    ):
        assert key in names, key
    assert not any(k.startswith("body.fc") for k in names)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in bb.modules())
    frozen = [m for m in bb.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(frozen) == 53 and all(m.eps == 1e-5 for m in frozen)
    with torch.no_grad():
        outs = bb.eval()(_images())
    assert _shapes(outs) == [(2, 256, 16, 24), (2, 512, 8, 12), (2, 1024, 4, 6), (2, 2048, 2, 3)]


def test_resnet18_out_indices_map_to_c3_c5():
    bb = build_backbone(Cfg(name="resnet18", out_indices=(1, 2, 3)))
    assert bb.out_channels == [128, 256, 512] and bb.strides == [8, 16, 32]
    with torch.no_grad():
        outs = bb.eval()(_images())
    assert _shapes(outs) == [(2, 128, 8, 12), (2, 256, 4, 6), (2, 512, 2, 3)]
    with pytest.raises(ValueError, match="out_indices"):
        build_backbone(Cfg(name="resnet18", out_indices=(0, 4)))


def test_frozen_stem_and_layer1_get_no_gradient():
    bb = build_backbone(Cfg(name="resnet18", frozen_stages=1)).train()
    grads = {n: p.requires_grad for n, p in bb.named_parameters()}
    assert not grads["body.conv1.weight"] and not grads["body.layer1.0.conv1.weight"]
    assert grads["body.layer2.0.conv1.weight"] and grads["body.layer4.1.conv2.weight"]
    assert not any("bn" in n for n in grads)  # FrozenBatchNorm2d has buffers only
    assert not bb.body.layer1.training and not bb.body.conv1.training and bb.body.layer2.training
    sum(o.sum() for o in bb(_images())).backward()
    assert bb.body.conv1.weight.grad is None and bb.body.layer1[0].conv1.weight.grad is None
    # (timm zero-inits each block's last BN scale, so with frozen BN only the shortcut convs see a gradient)
    assert bb.body.layer2[0].downsample[0].weight.grad.abs().sum() > 0

    none_frozen = build_backbone(Cfg(name="resnet18", frozen_stages=-1))
    assert all(p.requires_grad for p in none_frozen.parameters())
    with pytest.raises(ValueError, match="frozen_stages"):
        build_backbone(Cfg(name="resnet18", frozen_stages=5))


def test_trainable_bn_variant_updates_bn_but_not_frozen_stages():
    bb = build_backbone(Cfg(name="resnet18", norm="bn", frozen_stages=1)).train()
    assert isinstance(bb.body.bn1, nn.BatchNorm2d) and isinstance(bb.body.layer2[0].bn1, nn.BatchNorm2d)
    assert bb.body.layer2[0].bn1.weight.requires_grad and not bb.body.layer1[0].bn1.weight.requires_grad
    stem_mean = bb.body.bn1.running_mean.clone()
    l2_mean = bb.body.layer2[0].bn1.running_mean.clone()
    bb(_images())
    assert torch.equal(bb.body.bn1.running_mean, stem_mean)  # frozen stage stays in eval mode
    assert not torch.equal(bb.body.layer2[0].bn1.running_mean, l2_mean)


def test_frozen_bn_equals_batchnorm_in_eval():
    bn = nn.BatchNorm2d(8, eps=1e-5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(), bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2)
    frozen = convert_frozen_batchnorm(nn.Sequential(bn))[0]
    assert isinstance(frozen, FrozenBatchNorm2d) and frozen.eps == bn.eps
    x = torch.randn(2, 8, 5, 7)
    torch.testing.assert_close(frozen(x), bn.eval()(x))


def test_meta_device_builds_without_memory():
    with torch.device("meta"):
        r50 = build_backbone(Cfg())
        swin = build_backbone(
            Cfg(name="swin_large_patch4_window12_384", frozen_stages=-1, drop_path_rate=0.3, checkpointing=True)
        )
        vit = build_backbone(
            Cfg(
                name="eva02_large_patch14_448.mim_m38m_ft_in22k_in1k",
                frozen_stages=-1,
                out_indices=(0, 1, 2, 3, 4),
                drop_path_rate=0.4,
                checkpointing=True,
            )
        )
    for m in (r50, swin, vit):
        assert all(t.is_meta for t in [*m.parameters(), *m.buffers()])
    assert swin.out_channels == [192, 384, 768, 1536] and swin.strides == [4, 8, 16, 32]
    assert vit.out_channels == [256] * 5 and vit.strides == [4, 8, 16, 32, 64] and vit.has_neck
    assert vit.body.patch_embed.proj.weight.shape == (1024, 3, 16, 16)
    assert all(stage.grad_checkpointing for stage in swin.body.layers) and vit.body.grad_checkpointing
    assert 190e6 < sum(p.numel() for p in swin.parameters()) < 200e6  # Swin-L ~197M
    assert 300e6 < sum(p.numel() for p in vit.body.parameters()) < 310e6  # EVA-02 L ~304M
    assert isinstance(build_neck(vit), nn.Identity)
    assert isinstance(build_neck(swin), ChannelMapper)


def test_tiny_swin_forward_any_size():
    bb = build_backbone(Cfg(name="swin_tiny_patch4_window7_224", frozen_stages=-1), **TINY_SWIN)
    assert bb.out_channels == [32, 64, 128, 256] and bb.strides == [4, 8, 16, 32]
    assert len(bb.out_norms) == 4 and not any(k.startswith(("body.head", "body.norm")) for k in bb.state_dict())
    with torch.no_grad():
        outs = bb.eval()(_images(70, 90))  # not a multiple of the patch size or the window
    assert _shapes(outs) == [(2, 32, 18, 23), (2, 64, 9, 12), (2, 128, 5, 6), (2, 256, 3, 3)]
    frozen = build_backbone(Cfg(name="swin_tiny_patch4_window7_224", frozen_stages=1), **TINY_SWIN)
    assert not any(p.requires_grad for p in frozen.body.patch_embed.parameters())
    assert not any(p.requires_grad for p in frozen.body.layers[0].parameters())
    assert all(p.requires_grad for p in frozen.body.layers[1].parameters())


def test_tiny_vit_sfp_forward():
    cfg = Cfg(name="eva02_large_patch14_448", frozen_stages=-1, out_indices=(0, 1, 2, 3, 4))
    bb = build_backbone(cfg, **TINY_VIT)
    with torch.no_grad():
        outs = bb.eval()(_images())
    assert _shapes(outs) == [(2, 256, 16, 24), (2, 256, 8, 12), (2, 256, 4, 6), (2, 256, 2, 3), (2, 256, 1, 2)]
    keys = set(bb.state_dict())
    assert {"sfp.p2.1.weight", "sfp.p2.12.weight", "sfp.p3.4.weight", "sfp.p6.1.weight", "out_norm.weight"} <= keys
    assert bb.sfp.p6[1].stride == (2, 2) and bb.sfp.p2[1].bias is None
    with pytest.raises(ValueError, match="out_indices"):
        build_neck(build_backbone(replace(cfg, out_indices=(0, 1, 2, 3)), **TINY_VIT), 256, 5)


def test_sfp_levels_and_strides():
    sfp = SimpleFeaturePyramid(in_channels=64, out_channels=32, levels=(1, 2, 3))
    outs = sfp([torch.randn(1, 64, 6, 10)])
    assert _shapes(outs) == [(1, 32, 12, 20), (1, 32, 6, 10), (1, 32, 3, 5)]
    assert not hasattr(sfp, "p2") and not hasattr(sfp, "p6")


def _save(obj, path) -> str:
    torch.save(obj, path)
    return str(path)


def test_weights_roundtrip_torchvision_layout(tmp_path):
    src = build_backbone(Cfg(name="resnet18", norm="bn", frozen_stages=-1))
    with torch.no_grad():  # non-trivial statistics so that a wrong load would show
        for m in src.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5), m.weight.uniform_(0.5, 1.0)
    sd = dict(src.body.state_dict())  # plain torchvision names, with num_batches_tracked
    sd.update({"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)})
    wrapped = {"state_dict": {f"backbone.{k}": v for k, v in sd.items()}, "meta": {"epoch": 1}}
    dst = build_backbone(Cfg(name="resnet18", weights=_save(wrapped, tmp_path / "r18.pth")))
    x = _images()
    with torch.no_grad():
        for a, b in zip(src.eval()(x), dst.eval()(x)):
            torch.testing.assert_close(a, b)

    own = build_backbone(Cfg(name="resnet18", weights=_save(dst.state_dict(), tmp_path / "own.pt")))  # body.*
    torch.testing.assert_close(own.body.layer3[1].bn2.running_var, dst.body.layer3[1].bn2.running_var)


def test_weights_from_s3(s3_bucket):
    src = build_backbone(Cfg(name="resnet18"))
    buf = io.BytesIO()
    torch.save({"model": src.body.state_dict()}, buf)
    uri = storage.join(s3_bucket, "weights/r18.pt")
    storage.write_bytes(uri, buf.getvalue())
    dst = build_backbone(Cfg(name="resnet18", weights=uri))
    torch.testing.assert_close(dst.body.layer2[0].conv1.weight, src.body.layer2[0].conv1.weight)


def test_bad_keys_give_one_line_error(tmp_path):
    sd = dict(build_backbone(Cfg(name="resnet18")).body.state_dict())
    sd["layer9.conv.weight"] = sd.pop("layer2.0.conv1.weight")
    sd["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    with pytest.raises(ValueError) as err:
        build_backbone(Cfg(name="resnet18", weights=_save(sd, tmp_path / "bad.pt")))
    msg = str(err.value)
    assert "\n" not in msg and "layer2.0.conv1.weight" in msg and "layer9.conv.weight" in msg
    assert "conv1.weight (64, 3, 3, 3) != (64, 3, 7, 7)" in msg
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        build_backbone(Cfg(name="resnet18", weights=str(tmp_path / "nope.pt")))


def test_swin_weights_roundtrip_through_timm_filter(tmp_path):
    src = build_backbone(Cfg(name="swin_tiny_patch4_window7_224", frozen_stages=-1), **TINY_SWIN)
    path = _save(src.body.state_dict(), tmp_path / "swin.pt")
    dst = build_backbone(Cfg(name="swin_tiny_patch4_window7_224", frozen_stages=-1, weights=path), **TINY_SWIN)
    for k, v in src.body.state_dict().items():
        torch.testing.assert_close(dst.body.state_dict()[k], v, msg=k)


def test_config_errors():
    with pytest.raises(ValueError, match="unknown timm backbone 'resnet51'"):
        build_backbone(Cfg(name="resnet51"))
    with pytest.raises(ValueError, match="backbone.norm"):
        build_backbone(Cfg(norm="gn"))


def test_channel_mapper_shapes_names_and_init():
    neck = ChannelMapper([256, 512, 1024, 2048], 256, num_outs=5)
    feats = [torch.randn(1, c, 16 // 2**i, 24 // 2**i) for i, c in enumerate([256, 512, 1024, 2048])]
    outs = neck(feats)
    assert _shapes(outs) == [(1, 256, 16, 24), (1, 256, 8, 12), (1, 256, 4, 6), (1, 256, 2, 3), (1, 256, 1, 2)]
    shapes = {k: tuple(v.shape) for k, v in neck.state_dict().items()}
    assert shapes["convs.0.conv.weight"] == (256, 256, 1, 1) and shapes["convs.3.conv.weight"] == (256, 2048, 1, 1)
    assert shapes["extra_convs.0.conv.weight"] == (256, 2048, 3, 3) and shapes["convs.2.gn.bias"] == (256,)
    assert len(shapes) == 15 and not any(k.endswith("conv.bias") for k in shapes)
    assert neck.extra_convs[0].gn.num_groups == 32
    torch.testing.assert_close(outs[4], neck.extra_convs[0](feats[3]))  # extra level from the RAW C5
    w = neck.convs[3].conv.weight
    bound = math.sqrt(6.0 / (2048 + 256))  # xavier-uniform bound
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    six = ChannelMapper([256, 512, 1024, 2048], 256, num_outs=6)
    assert tuple(six.extra_convs[1].conv.weight.shape) == (256, 256, 3, 3) and len(six(feats)) == 6
    with pytest.raises(ValueError, match="expects 4 input maps"):
        neck(feats[:3])


def _load_golden():
    if not os.path.isdir(GOLDEN):
        pytest.skip(f"golden reference {GOLDEN} not available")
    spec = importlib.util.spec_from_file_location("golden_make_weights", os.path.join(GOLDEN, "make_weights.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_golden_resnet50_and_neck_match_authors():
    """The authors' C2..C5 and neck statistics for their weights, mapped by a prefix change only."""
    mw = _load_golden()
    rows = [r for r in mw.read_keys() if r[0].startswith(("backbone.", "neck."))]
    sd = {n: mw.make_tensor(n, s, d) for n, s, d in rows}
    bb = build_backbone(Cfg()).eval()
    neck = ChannelMapper(bb.out_channels, 256, 5).eval()
    bb.load_state_dict({"body." + k[9:]: v for k, v in sd.items() if k.startswith("backbone.")})
    neck.load_state_dict({k[5:]: v for k, v in sd.items() if k.startswith("neck.")})
    inputs = torch.load(os.path.join(GOLDEN, "inputs.pt"), weights_only=False)
    expected = torch.load(os.path.join(GOLDEN, "expected.pt"), weights_only=False)["stats"]
    mean = torch.tensor(inputs["pixel_mean"]).view(3, 1, 1)
    std = torch.tensor(inputs["pixel_std"]).view(3, 1, 1)
    x = torch.zeros(len(inputs["images_uint8_hwc"]), 3, *inputs["batch_shape"])
    for i, img in enumerate(inputs["images_uint8_hwc"]):
        x[i, :, : img.shape[0], : img.shape[1]] = (img.permute(2, 0, 1).float() - mean) / std
    with torch.no_grad():
        feats = bb(x)
        outs = neck(feats)

    def stats(t):
        return torch.stack([t.mean(), t.std(), t.abs().mean()])

    for got, want in zip(feats + outs, expected["backbone"] + expected["neck"]):
        torch.testing.assert_close(stats(got), want, rtol=1e-4, atol=1e-5)
