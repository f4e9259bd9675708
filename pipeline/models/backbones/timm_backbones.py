"""Image backbones by timm name [CO_DETR_SPEC 1.1 Backbone, 6 Large-scale recipes, 8.2 key names].

`build_backbone(cfg)` picks one wrapper by the timm model name:

- CNNs (default `resnet50`): `timm.create_model(name, features_only=True)`. Our `out_indices` count the
  stride-4.. stages (0..3 = C2..C5); the stride-2 stem entries of timm's feature list are skipped (for a ResNet
  timm index 0 is the stem activation, C2..C5 are timm 1..4). Parameter names stay the plain timm/torchvision ones
  under `body.` (`body.conv1.weight`, `body.layer1.0.bn1.running_mean`, no `fc`), so the authors'
  `backbone.conv1.weight` is `backbone.body.conv1.weight` here. Note: the authors initialise from
  `torchvision://resnet50`; with timm that is `name="resnet50.tv_in1k", pretrained=True` (plain `resnet50`
  downloads timm's own `a1_in1k` weights).
- Swin (`swin_*`, e.g. `swin_large_patch4_window12_384`): timm Swin with any input size (`strict_img_size=False`,
  input padded to the patch size), windows always partitioned and shifted like the detection Swin
  (`always_partition=True`), and one LayerNorm per returned stage (`out_norms`, the authors' `norm{i}`).
  timm's stages are NHWC; outputs are permuted to NCHW. Deviation: timm rolls (cyclic shift) before padding a
  map that is not a multiple of the window, the original pads first; identical when sizes are multiples of
  32 * window / 4.
- Plain ViT (`vit_*`, `eva*`, `deit*`, e.g. `eva02_large_patch14_448.mim_m38m_ft_in22k_in1k`): timm trunk at
  patch size 16 (pretrained patch embeddings are resampled by timm, as the authors do from EVA-02's 14), position
  embeddings on a 32x32 grid (the authors' `pretrain_img_size=512`) resampled to each input, then the authors'
  `out_norm` LayerNorm and their simple feature pyramid (`neck.SimpleFeaturePyramid`) -> 256-channel maps at
  strides 4..64 (`out_indices` pick among those 5 levels). `has_neck=True`: `neck.build_neck` then adds no
  ChannelMapper. Deviation: timm's EVA attends globally in every block; the authors' ViT-L uses 24x24 windows
  in 3 of every 4 blocks (same weights, different attention pattern and memory). The ViT-L recipes use the
  authors' network instead (`name: vit_authors`, pipeline/models/backbones/build.py, vit.py, necks/sfp.py).

`frozen_stages` (all wrappers): -1 nothing, 0 the stem (ResNet conv1+bn1, patch embedding), k>0 the stem and
the first k stages/blocks; frozen modules get `requires_grad=False` and stay in eval mode. The authors freeze
stem + layer1 for ResNet (1) and nothing for Swin-L / ViT-L (set -1 there). `norm="frozen_bn"` turns every
BatchNorm into FrozenBatchNorm2d (no-op for the LayerNorm models); `norm="bn"` keeps trainable BatchNorm (from
scratch). Construction allocates nothing data dependent, so it works under `with torch.device("meta")`.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import timm
import torch
from torch import Tensor, nn

from pipeline.models.backbones.frozen_bn import convert_frozen_batchnorm, freeze_module
from pipeline.models.necks.channel_mapper import SimpleFeaturePyramid

if TYPE_CHECKING:
    from pipeline.models.config import BackboneConfig

__all__ = ["Backbone", "CNNBackbone", "SwinBackbone", "ViTBackbone", "build_backbone", "load_backbone_weights"]

VIT_PREFIXES = ("vit_", "eva", "deit")
SWIN_PREFIXES = ("swin_",)
VIT_PATCH_SIZE = 16  # the authors' ViT-L patch size (EVA-02's 14 is resampled)
VIT_POS_GRID_IMG_SIZE = 512  # pretrain_img_size in the authors' ViT-L config: 32x32 position grid
SFP_CHANNELS = 256
_HEAD_PREFIXES = ("fc.", "head.", "fc_norm.", "norm.", "classifier.", "lm_head.")  # classifier parts, dropped


class Backbone(nn.Module):
    """Base wrapper: `forward(images (B, 3, H, W)) -> list of (B, out_channels[i], ~H/strides[i], ~W/strides[i])`.

    `body` is the timm model; `frozen` names the submodules kept frozen and in eval mode by `train()`.
    """

    out_channels: list[int]
    strides: list[int]
    has_neck: bool = False  # True when the backbone already ends in its own pyramid neck (ViT + SFP)
    body: Any  # the timm nn.Module (typed Any: its attributes are timm-specific)

    def __init__(self) -> None:
        super().__init__()
        self.frozen: tuple[str, ...] = ()

    def stem_and_stages(self) -> tuple[list[str], list[str]]:
        """Submodule names of the stem and of the stages, in forward order."""
        raise NotImplementedError

    def freeze_stages(self, frozen_stages: int) -> None:
        """Freeze the stem (frozen_stages >= 0) and the first `frozen_stages` stages; -1 freezes nothing."""
        stem, stages = self.stem_and_stages()
        if not -1 <= frozen_stages <= len(stages):
            raise ValueError(f"frozen_stages={frozen_stages} must be in -1..{len(stages)} for this backbone")
        names = [] if frozen_stages < 0 else stem + stages[:frozen_stages]
        for name in names:
            freeze_module(self.get_submodule(name))
        self.frozen = tuple(names)

    def set_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing inside the timm body (memory only)."""
        self.body.set_grad_checkpointing(enable)

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        for name in self.frozen:
            self.get_submodule(name).eval()
        return self


class CNNBackbone(Backbone):
    """timm `features_only` CNN (ResNet & co.); `out_indices` 0..3 = the stride 4, 8, 16, 32 stages."""

    def __init__(self, name: str, out_indices: Sequence[int], pretrained: bool = False, **timm_kwargs: Any):
        super().__init__()
        with torch.device("meta"):  # read the feature list without allocating anything
            probe = timm.create_model(name, features_only=True, pretrained=False, **timm_kwargs)
        feature_info: Any = probe.feature_info
        reductions = feature_info.reduction()
        first = next((i for i, r in enumerate(reductions) if r >= 4), None)
        if first is None:
            raise ValueError(f"timm model {name!r} has no feature map of stride >= 4 (strides {reductions})")
        num_stages = len(reductions) - first
        if any(i >= num_stages for i in out_indices):
            raise ValueError(f"out_indices {tuple(out_indices)} out of range 0..{num_stages - 1} for {name!r}")
        self.body = timm.create_model(
            name, features_only=True, out_indices=[first + i for i in out_indices], pretrained=pretrained,
            **timm_kwargs,
        )  # fmt: skip
        children = [n for n, _ in self.body.named_children()]
        stage_names = [feature_info.module_name()[first + i].replace(".", "_") for i in range(num_stages)]
        if stage_names[0] not in children:
            raise ValueError(
                f"timm model {name!r} is not supported: its features_only wrapper has no stage module "
                f"{stage_names[0]!r} (children {children[:6]}...); use a ResNet-like CNN, swin_* or vit_*/eva*"
            )
        self._stem = children[: children.index(stage_names[0])]
        self._stages = [n for n in stage_names if n in children]
        self.out_channels = list(self.body.feature_info.channels())
        self.strides = list(self.body.feature_info.reduction())

    def stem_and_stages(self) -> tuple[list[str], list[str]]:
        return [f"body.{n}" for n in self._stem], [f"body.{n}" for n in self._stages]

    def forward(self, images: Tensor) -> list[Tensor]:
        return list(self.body(images))


class SwinBackbone(Backbone):
    """timm Swin (v1) with per-output LayerNorms; `out_indices` 0..3 = stages at strides 4, 8, 16, 32."""

    def __init__(
        self, name: str, out_indices: Sequence[int], pretrained: bool = False, drop_path_rate: float = 0.0,
        **timm_kwargs: Any,
    ):  # fmt: skip
        super().__init__()
        from timm.layers import PatchEmbed

        self.body = timm.create_model(
            name, pretrained=pretrained, num_classes=0, strict_img_size=False, always_partition=True,
            embed_layer=partial(PatchEmbed, dynamic_img_pad=True), drop_path_rate=drop_path_rate, **timm_kwargs,
        )  # fmt: skip
        num_stages = len(self.body.layers)
        if any(i >= num_stages for i in out_indices):
            raise ValueError(f"out_indices {tuple(out_indices)} out of range 0..{num_stages - 1} for {name!r}")
        info = self.body.feature_info
        self.out_indices = tuple(out_indices)
        self.out_channels = [int(info[i]["num_chs"]) for i in out_indices]
        self.strides = [int(info[i]["reduction"]) for i in out_indices]
        self.body.prune_intermediate_layers(list(out_indices), prune_norm=True, prune_head=True)
        self.out_norms = nn.ModuleList(nn.LayerNorm(c) for c in self.out_channels)

    def stem_and_stages(self) -> tuple[list[str], list[str]]:
        return ["body.patch_embed"], [f"body.layers.{i}" for i in range(len(self.body.layers))]

    def forward(self, images: Tensor) -> list[Tensor]:
        x = self.body.patch_embed(images)  # (B, H/4, W/4, C0) NHWC
        outs = []
        for i, stage in enumerate(self.body.layers):
            x = stage(x)
            if i in self.out_indices:
                norm = self.out_norms[self.out_indices.index(i)]
                outs.append(norm(x).permute(0, 3, 1, 2).contiguous())  # NHWC -> NCHW
        return outs


class ViTBackbone(Backbone):
    """Plain timm ViT / EVA-02 (stride 16) + `out_norm` + simple feature pyramid -> 256-channel maps.

    `out_indices` pick SFP levels 0..4 = strides 4, 8, 16, 32, 64 (Co-DINO uses all five).
    """

    has_neck = True

    def __init__(
        self, name: str, out_indices: Sequence[int], pretrained: bool = False, drop_path_rate: float = 0.0,
        **timm_kwargs: Any,
    ):  # fmt: skip
        super().__init__()
        kwargs: dict[str, Any] = dict(patch_size=VIT_PATCH_SIZE, img_size=VIT_POS_GRID_IMG_SIZE)
        kwargs.update(timm_kwargs)
        self.body = timm.create_model(
            name, pretrained=pretrained, num_classes=0, dynamic_img_size=True, dynamic_img_pad=True,
            drop_path_rate=drop_path_rate, **kwargs,
        )  # fmt: skip
        if max(self.body.patch_embed.patch_size) != 16:
            raise ValueError(f"ViT backbone needs patch size 16 for strides 4..64, got {self.body.patch_embed}")
        self.body.prune_intermediate_layers(1, prune_norm=True, prune_head=True)  # keep all blocks, drop head
        embed_dim = int(self.body.embed_dim)
        self.out_norm = nn.LayerNorm(embed_dim)  # the authors' `out_norm` (nn.LayerNorm default eps 1e-5)
        self.sfp = SimpleFeaturePyramid(embed_dim, SFP_CHANNELS, levels=tuple(out_indices))
        self.out_channels = [SFP_CHANNELS] * len(out_indices)
        self.strides = [4 * 2**i for i in out_indices]

    def stem_and_stages(self) -> tuple[list[str], list[str]]:
        return ["body.patch_embed"], [f"body.blocks.{i}" for i in range(len(self.body.blocks))]

    def freeze_stages(self, frozen_stages: int) -> None:
        super().freeze_stages(frozen_stages)
        if frozen_stages >= 0:  # the stem also owns the position embedding and prefix tokens
            for pname in ("pos_embed", "cls_token", "reg_token"):
                p = getattr(self.body, pname, None)
                if isinstance(p, nn.Parameter):
                    p.requires_grad_(False)

    def forward(self, images: Tensor) -> list[Tensor]:
        (x,) = self.body.forward_intermediates(images, indices=1, output_fmt="NCHW", intermediates_only=True)
        x = self.out_norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, C, ceil(H/16), ceil(W/16))
        return self.sfp([x])


def build_backbone(cfg: BackboneConfig, **timm_kwargs: Any) -> Backbone:
    """Backbone for `cfg` (any object with BackboneConfig's fields).

    `timm_kwargs` go to `timm.create_model` unchanged (e.g. tiny variants in tests: `depths=(1, 1, 1, 1)`).
    """
    name = cfg.name
    out_indices = tuple(int(i) for i in cfg.out_indices)
    if not out_indices or list(out_indices) != sorted(set(out_indices)) or out_indices[0] < 0:
        raise ValueError(f"backbone.out_indices must be increasing indices >= 0, got {cfg.out_indices!r}")
    if cfg.norm not in ("frozen_bn", "bn"):
        raise ValueError(f"backbone.norm must be 'frozen_bn' or 'bn', got {cfg.norm!r}")
    if not 0.0 <= cfg.drop_path_rate < 1.0:
        raise ValueError(f"backbone.drop_path_rate must be in [0, 1), got {cfg.drop_path_rate!r}")
    if not timm.is_model(name):
        raise ValueError(
            f"unknown timm backbone {name!r}; e.g. resnet50, resnet50.tv_in1k, swin_large_patch4_window12_384, "
            f"eva02_large_patch14_448.mim_m38m_ft_in22k_in1k"
        )
    backbone: Backbone
    if name.startswith(VIT_PREFIXES):
        backbone = ViTBackbone(name, out_indices, cfg.pretrained, cfg.drop_path_rate, **timm_kwargs)
    elif name.startswith(SWIN_PREFIXES):
        backbone = SwinBackbone(name, out_indices, cfg.pretrained, cfg.drop_path_rate, **timm_kwargs)
    else:
        if cfg.drop_path_rate > 0:
            timm_kwargs = {"drop_path_rate": cfg.drop_path_rate, **timm_kwargs}
        backbone = CNNBackbone(name, out_indices, cfg.pretrained, **timm_kwargs)
    if cfg.norm == "frozen_bn":
        backbone.body = convert_frozen_batchnorm(backbone.body)
    backbone.freeze_stages(cfg.frozen_stages)
    if cfg.checkpointing:
        backbone.set_checkpointing(True)
    if cfg.weights:
        load_backbone_weights(backbone, cfg.weights)
    return backbone


def _read_state_dict(uri: str) -> dict[str, Tensor]:
    """Read a torch file from a local path or any fsspec URI; unwrap {"state_dict"|"model": ...}."""
    from pipeline.storage import get_fs

    fs, path = get_fs(uri)
    try:
        with fs.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"backbone weights not found: {uri!r}") from e
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"backbone weights {uri!r} hold pickled Python objects that weights_only loading refuses ({first}); "
            f"re-save just the state dict: torch.save(ckpt['state_dict'], path)"
        ) from e
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise ValueError(f"backbone weights {uri!r}: expected a state dict (str -> Tensor), got {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}


def _listed(keys: list[str], limit: int = 8) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return "[" + ", ".join(keys[:limit]) + "]" + more


def load_backbone_weights(backbone: Backbone, uri: str) -> None:
    """Load a backbone state dict from `uri` (local path or fsspec URI such as s3://) strictly.

    Accepted layouts: a raw state dict, or {"state_dict"|"model": state dict}; keys may carry a `backbone.`
    prefix (a full detector checkpoint: only its `backbone.*` keys are used). Keys starting with `body.` load
    into the whole wrapper (a file saved from `Backbone.state_dict()`); other keys are plain timm/torchvision
    names for `backbone.body` (classifier keys such as `fc.*` are dropped; Swin/ViT files go through timm's
    own checkpoint filter first, which converts original Microsoft Swin / EVA-02 layouts and resamples patch
    and position embeddings). Raises one-line ValueError naming missing, unexpected and mis-shaped keys.
    """
    state = _read_state_dict(uri)
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    target: nn.Module = backbone
    if not any(k.startswith("body.") for k in state):
        target = backbone.body
        if isinstance(backbone, (SwinBackbone, ViTBackbone)):
            filter_fn = getattr(__import__(type(target).__module__, fromlist=["_"]), "checkpoint_filter_fn", None)
            if filter_fn is not None:
                state = filter_fn(state, target)
    expected = target.state_dict()
    state = {k: v for k, v in state.items() if k in expected or not k.startswith(_HEAD_PREFIXES)}
    state = {k: v for k, v in state.items() if k in expected or not k.endswith("num_batches_tracked")}
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(v.shape)} != {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"backbone weights {uri!r} do not fit {type(backbone).__name__}: missing {_listed(missing)}, "
            f"unexpected {_listed(unexpected)}, shape mismatch {_listed(shapes)}"
        )
    target.load_state_dict(state, strict=False)  # checked above; FrozenBN drops num_batches_tracked itself
