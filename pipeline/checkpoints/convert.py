"""Authors' Co-DETR checkpoints (Co-DINO and Co-Deformable-DETR; Sense-X mmdet 2.x and mmdet 3.x ports) -> our names.

    obj = torch.load("co_dino_5scale_r50_1x_coco.pth", map_location="cpu")
    sd, meta = split_checkpoint(obj)                        # {"state_dict", "meta"} or a raw state dict
    conv = convert_checkpoint(sd, aux_heads=cfg.co.aux_heads, out_indices=cfg.backbone.out_indices)
    model.load_state_dict(fit_to_model(conv, model.state_dict()), strict=True)    # raises on any mismatch

Name tables (CO_DETR_SPEC.md 8.2); the first matching rule wins. Deployed part (`DEPLOYED_RULES`):
  backbone.X (ResNet: conv1, bn1, layer{1-4}.*)      -> backbone.body.X
  backbone (Swin, original Microsoft / Sense-X `SwinTransformerV1` naming) -> timm `swin_*` (`SWIN_RULES`):
    backbone.patch_embed.{proj,norm}.*                -> backbone.body.patch_embed.{proj,norm}.*
    backbone.layers.s.blocks.b.*                      -> backbone.body.layers.s.blocks.b.*   (same leaf names)
    backbone.layers.s.downsample.{reduction,norm}.*   -> backbone.body.layers.{s+1}.downsample.*
                                 (timm merges patches at the start of the next stage; same channel order)
    backbone.norm{i}.*                                -> backbone.out_norms.{out_indices.index(i)}.*
  backbone (Swin, mmdet `SwinTransformer` naming of the mmdet 3.x copies): stages.s -> layers,
    attn.w_msa.* -> attn.*, ffn.layers.{0.0,1} -> mlp.fc{1,2}, patch_embed.projection -> proj;
    downsample moved to stage s+1 with the nn.Unfold channel order (c-major) put back into the concatenation
    order (block-major x00, x10, x01, x11), the inverse of mmdet's `correct_unfold_{reduction,norm}_order`.
  neck.*                                             -> neck.*                   (same names)
  query_head.transformer.{level_embeds,enc_output,enc_output_norm,query_embed} -> transformer.*
  query_head.transformer.encoder.layers.i.attentions.0.*   -> transformer.encoder.layers.i.self_attn.*
                                          .ffns.0.layers.0.0.* / .ffns.0.layers.1.* -> .ffn.linear{1,2}.*
                                          .norms.{0,1}.*    -> .norm{1,2}.*
  query_head.transformer.decoder.layers.i.attentions.0.attn.* -> transformer.decoder.layers.i.self_attn.*
                                          .attentions.1.*   -> .cross_attn.*;  .norms.{0,1,2} -> .norm{1,2,3}
  query_head.transformer.decoder.{ref_point_head,norm}.*     -> transformer.decoder.*
  query_head.{cls_branches,reg_branches}.*           -> head.*
  query_head.label_embedding.weight | query_head.dn_generator.label_embedding.weight
                                                     -> denoising.label_embedding.weight
Training-only auxiliary part (`AUX_KEY_MAP`), mapped only onto the aux heads the target model has:
  query_head.transformer.aux_pos_trans{,_norm}.g.*   -> aux_query_proj.aux_pos_trans{,_norm}.{k}.*
  query_head.downsample.*                            -> adapter.downsample.*     (whenever K > 0)
  per head, its row's `checkpoint` column of the head table (pipeline/models/aux_heads/table.py), e.g.
  rpn_head.* / roi_head.0.*                          -> aux_heads.{k}.rpn_head.* / aux_heads.{k}.roi_head.*
  bbox_head.0.*                                      -> aux_heads.{k}.*          (ATSS)
Group g of the checkpoint is its g-th head in the authors' order (RoI heads first, then dense heads) among the
heads it holds; k is that head's index in our model. A K = 0 model skips every aux key, a K = 1 (ATSS) model
loads aux_pos_trans.1 of a K = 2 checkpoint as its group 0; skipped keys are reported (`skipped_aux`).
Dropped with a report: EMA copies (`ema_*`) and buffers that are no parameters (`num_batches_tracked`, FedLoss
`fed_loss_weight`, Swin `relative_position_index` / `attn_mask`, `data_preprocessor.*`).

Co-Deformable-DETR (`model.arch: co_deformable_detr`, CO_DETR_SPEC.md 8 "Co-Deformable-specific keys"):
  query_head.query_embedding.*                       -> transformer.query_embedding.*
  query_head.transformer.pos_trans{,_norm}.*         -> transformer.pos_trans{,_norm}.*
  query_head.transformer.pos_feats_{trans,norm}.g.*  -> aux_query_proj.pos_feats_{trans,norm}.{k}.*
  query_head.transformer.head_pos_embed.weight (G, 1) -> aux_query_proj.head_pos_embed.weight, our groups' rows
  (aux_pos_trans{,_norm} as above; the decoder has no norm / ref_point_head, the head no label_embedding).

ViT-L + SFP (`backbone.blocks.*` present; `backbone_format` "vit"): `backbone.*` through
`vit_keys.vit_block_leaf` (q_bias/v_bias -> q_proj/v_proj.bias, mlp.w1/w2/ffn_ln/w3 -> fc1_g/fc1_x/norm/fc2, the
rest unchanged), `neck.p2..p6.*` unchanged; the rotary tables (`*.rope*.freqs_cos/freqs_sin`) are dropped with
the buffers (ours are computed). FedLoss buffers `{query_head,bbox_head.0,roi_head.0.bbox_head}.loss_cls.
fed_loss_weight`: with `fed_loss=True` (a target model with `model.loss.fed_loss`) kept as our FedLoss modules'
`{head,aux_heads.k,aux_heads.k.roi_head.bbox_head}.fed_loss.fed_loss_weight` (pipeline/models/fed_loss.py),
else dropped with the buffers.
"""

from __future__ import annotations

import io
import pickle
import re
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from pipeline.checkpoints.vit_keys import vit_block_leaf
from pipeline.models.aux_heads.table import AUX_HEADS, group_order

AUX_ORDER = tuple(group_order(list(AUX_HEADS)))  # the authors' aux group order: RoI heads first, then dense heads

_DROPPED_BUFFERS = (r"\.num_batches_tracked$", r"\.fed_loss_weight$", r"\.relative_position_index$",
                    r"\.attn_mask$", r"^data_preprocessor\.", r"(^|\.)rope[^.]*\.freqs_(cos|sin)$")  # fmt: skip
_FED_LOSS_WEIGHT = ".loss_cls.fed_loss_weight"  # the authors' FedLoss buffer leaf; ours `.fed_loss.fed_loss_weight`
_EMA = r"^ema_"

# (regex on the authors' name, replacement) for the deployed part after the backbone, tried in order.
DEPLOYED_RULES: list[tuple[str, str]] = [
    (r"^neck\.(.*)$", r"neck.\1"),
    (r"^query_head\.transformer\.(level_embeds|enc_output\..*|enc_output_norm\..*|query_embed\..*)$",
     r"transformer.\1"),
    (r"^query_head\.transformer\.encoder\.layers\.(\d+)\.attentions\.0\.(.*)$",
     r"transformer.encoder.layers.\1.self_attn.\2"),
    (r"^query_head\.transformer\.(encoder|decoder)\.layers\.(\d+)\.ffns\.0\.layers\.0\.0\.(.*)$",
     r"transformer.\1.layers.\2.ffn.linear1.\3"),
    (r"^query_head\.transformer\.(encoder|decoder)\.layers\.(\d+)\.ffns\.0\.layers\.1\.(.*)$",
     r"transformer.\1.layers.\2.ffn.linear2.\3"),
    (r"^query_head\.transformer\.decoder\.layers\.(\d+)\.attentions\.0\.attn\.(.*)$",
     r"transformer.decoder.layers.\1.self_attn.\2"),
    (r"^query_head\.transformer\.decoder\.layers\.(\d+)\.attentions\.1\.(.*)$",
     r"transformer.decoder.layers.\1.cross_attn.\2"),
    (r"^query_head\.transformer\.(encoder|decoder)\.layers\.(\d+)\.norms\.(\d)\.(.*)$",
     r"transformer.\1.layers.\2.norms.\3.\4"),  # then norms.k -> norm{k+1} (_NORM_RULE)
    (r"^query_head\.transformer\.decoder\.(ref_point_head\..*|norm\..*)$", r"transformer.decoder.\1"),
    (r"^query_head\.(cls_branches\..*|reg_branches\..*)$", r"head.\1"),
    (r"^query_head\.(?:dn_generator\.)?label_embedding\.weight$", r"denoising.label_embedding.weight"),
    # Co-Deformable-DETR: content queries live in the head for the authors, pos_trans in their transformer
    (r"^query_head\.query_embedding\.(.*)$", r"transformer.query_embedding.\1"),
    (r"^query_head\.transformer\.(pos_trans\..*|pos_trans_norm\..*)$", r"transformer.\1"),
]
_NORM_RULE = re.compile(r"^(transformer\.(?:encoder|decoder)\.layers\.\d+\.)norms\.(\d)\.(.*)$")

# Swin leaves of mmdet's naming -> timm's (the original Microsoft leaves are timm's already)
_MMDET_SWIN_LEAVES = [(r"^attn\.w_msa\.(.*)$", r"attn.\1"), (r"^ffn\.layers\.0\.0\.(.*)$", r"mlp.fc1.\1"),
                      (r"^ffn\.layers\.1\.(.*)$", r"mlp.fc2.\1"), (r"^(norm[12]\..*)$", r"\1")]  # fmt: skip

# AUXILIARY KEYS (training-only): `{g}` is the group index, `{k}` our head index (see the module docstring).
AUX_KEY_MAP: dict[str, str] = {
    r"^query_head\.transformer\.aux_pos_trans\.(\d+)\.(.*)$": r"aux_query_proj.aux_pos_trans.{k}.\2",
    r"^query_head\.transformer\.aux_pos_trans_norm\.(\d+)\.(.*)$":
        r"aux_query_proj.aux_pos_trans_norm.{k}.\2",
    r"^query_head\.transformer\.pos_feats_trans\.(\d+)\.(.*)$": r"aux_query_proj.pos_feats_trans.{k}.\2",
    r"^query_head\.transformer\.pos_feats_norm\.(\d+)\.(.*)$": r"aux_query_proj.pos_feats_norm.{k}.\2",
    r"^query_head\.downsample\.(.*)$": r"adapter.downsample.\1",
    # the heads' own keys, from the head table
    **{pattern: "aux_heads.{k}." + ours for name in AUX_ORDER for pattern, ours in AUX_HEADS[name].checkpoint},
}
_HEAD_POS_EMBED = "query_head.transformer.head_pos_embed.weight"  # Co-Deformable (G, 1), rows = groups
_AUX_OWNER = {pattern: name for name in AUX_ORDER for pattern, _ in AUX_HEADS[name].checkpoint}

Transform = Callable[[Tensor], Tensor]


@dataclass
class Conversion:
    """Result of `convert_checkpoint`. state: our name -> tensor; origin: our name -> the authors' name;
    the lists hold the authors' names of keys that were not mapped, by reason."""

    state: dict[str, Tensor] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    skipped_aux: list[str] = field(default_factory=list)
    dropped_ema: list[str] = field(default_factory=list)
    dropped_buffers: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    backbone_format: str = "resnet"  # "resnet" | "swin-v1" (Microsoft / Sense-X) | "swin-mmdet" | "vit"
    checkpoint_aux_heads: tuple[str, ...] = ()

    def summary(self) -> dict[str, Any]:
        lists = ("skipped_aux", "dropped_ema", "dropped_buffers", "unknown")
        counts = {k: len(getattr(self, k)) for k in lists}
        return {"mapped": len(self.state), **counts, "backbone_format": self.backbone_format,
                "checkpoint_aux_heads": list(self.checkpoint_aux_heads)}  # fmt: skip


def listed(names: Sequence[str], limit: int = 8) -> str:
    """`a, b, c ... (+N more)`: a bounded one-line listing of names."""
    more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class _Stub:
    """Stand-in for a pickled object whose class is not installed here (e.g. mmengine's HistoryBuffer)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _TolerantUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_Stub,), {"__module__": f"stub.{module}"})


_TOLERANT_PICKLE = types.SimpleNamespace(Unpickler=_TolerantUnpickler, load=pickle.load, __name__="tolerant")


def load_checkpoint_bytes(data: bytes, trust_pickle: bool = False) -> Any:
    """torch.load of a checkpoint file's bytes onto the CPU, with `weights_only=True` first. Files that
    also hold other pickled objects (mmengine's `message_hub`, numpy scalars in `meta`) need trust_pickle:
    a full unpickle (runs code from the file: only for files you trust), where classes that are not installed
    here become inert stubs. Without it such a file is a one-line ValueError naming the refused object."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust_pickle:
            m = re.search(r"GLOBAL (\S+)", str(e))
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            why = f"global {m.group(1)}" if m else first
            raise ValueError(f"the checkpoint holds pickled objects that weights_only loading refuses "
                             f"({why}); pass --trust-pickle to load it fully if you trust the file") from e
    buf = io.BytesIO(data)
    return torch.load(buf, map_location="cpu", weights_only=False, pickle_module=_TOLERANT_PICKLE)


def split_checkpoint(obj: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An mmcv / mmengine checkpoint ({"state_dict", "meta", ...}), a {"model": ...} dict or a raw state
    dict -> (state dict, meta or {})."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a checkpoint dict or a state dict, got {type(obj).__name__}")
    meta = obj.get("meta") if isinstance(obj.get("meta"), Mapping) else {}
    for key in ("state_dict", "model"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    sd = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    other = [str(k) for k, v in obj.items() if not isinstance(v, Tensor)]
    if not sd or other:
        raise ValueError(f"expected a state dict of tensors, got {len(sd)} tensors and non-tensor entries "
                         f"[{listed(other)}]")  # fmt: skip
    return sd, dict(meta)


def checkpoint_classes(meta: Mapping[str, Any]) -> list[str] | None:
    """Class names stored by mmdet: `meta["CLASSES"]` (2.x) or `meta["dataset_meta"]["classes"]` (3.x)."""
    names = meta.get("CLASSES")
    if names is None and isinstance(meta.get("dataset_meta"), Mapping):
        names = meta["dataset_meta"].get("classes")
    return [str(n) for n in names] if names is not None else None


def unknown_keys_message(names: Sequence[str]) -> str:
    return f"{len(names)} checkpoint key(s) with no known mapping: {listed(names)}"


# ---------------------------------------------------------------------------------------------------------
def _unfold_to_concat_reduction(w: Tensor) -> Tensor:
    """mmdet PatchMerging reduction (out, 4C) with nn.Unfold input order (c, kh, kw) -> timm / original order
    (block x00, x10, x01, x11; c)."""
    out_ch, in_ch = w.shape
    return w.reshape(out_ch, in_ch // 4, 4).transpose(1, 2)[:, [0, 2, 1, 3], :].reshape(out_ch, in_ch)


def _unfold_to_concat_norm(v: Tensor) -> Tensor:
    """mmdet PatchMerging norm (4C,) in nn.Unfold order -> timm / original order."""
    return v.reshape(-1, 4).transpose(0, 1)[[0, 2, 1, 3], :].reshape(-1)


def _backbone_name(name: str, out_indices: Sequence[int]) -> tuple[str | None, Transform | None]:
    """(our name or None when unknown, value transform or None) for an authors' `backbone.*` key."""
    m = re.match(r"^backbone\.norm(\d+)\.(weight|bias)$", name)  # Swin per-output norms (both namings)
    if m:
        i = int(m.group(1))
        new = f"backbone.out_norms.{list(out_indices).index(i)}.{m.group(2)}" if i in out_indices else None
        return new, None
    m = re.match(r"^backbone\.layers\.(\d+)\.downsample\.(.*)$", name)  # Swin v1: end of s -> start of s+1
    if m:
        return f"backbone.body.layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}", None
    m = re.match(r"^backbone\.stages\.(\d+)\.downsample\.(reduction|norm)\.(.*)$", name)  # Swin, mmdet naming
    if m:
        fn = _unfold_to_concat_reduction if m.group(2) == "reduction" else _unfold_to_concat_norm
        return f"backbone.body.layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}.{m.group(3)}", fn
    m = re.match(r"^backbone\.stages\.(\d+)\.blocks\.(\d+)\.(.*)$", name)
    if m:
        for pattern, repl in _MMDET_SWIN_LEAVES:
            if re.match(pattern, m.group(3)):
                leaf = re.sub(pattern, repl, m.group(3))
                return f"backbone.body.layers.{m.group(1)}.blocks.{m.group(2)}.{leaf}", None
        return None, None
    if name.startswith("backbone.patch_embed.projection."):
        return "backbone.body.patch_embed.proj." + name[len("backbone.patch_embed.projection."):], None
    m = re.match(r"^backbone\.(.*)$", name)  # ResNet names, Swin v1 patch_embed / blocks: timm's own
    return (f"backbone.body.{m.group(1)}", None) if m else (None, None)


def _deployed_name(name: str) -> str | None:
    for pattern, repl in DEPLOYED_RULES:
        if re.match(pattern, name):
            new = re.sub(pattern, repl, name)
            m = _NORM_RULE.match(new)
            return f"{m.group(1)}norm{int(m.group(2)) + 1}.{m.group(3)}" if m else new
    return None


def _aux_name(name: str, ours: Sequence[str], theirs: Sequence[str]) -> tuple[bool, str | None]:
    """(is an aux key, our name or None when our model has no such part). ours / theirs: aux heads of our
    model and of the checkpoint, each in AUX_ORDER."""
    for pattern, repl in AUX_KEY_MAP.items():
        m = re.match(pattern, name)
        if not m:
            continue
        owner = next((h for p, h in _AUX_OWNER.items() if re.match(p, name)), None)
        if not ours:
            return True, None
        if "aux_pos_trans" in pattern or "pos_feats" in pattern:  # per-group modules
            groups = theirs or AUX_ORDER  # no head keys in the checkpoint: assume the authors' K = 2 order
            owner = groups[int(m.group(1))] if int(m.group(1)) < len(groups) else None
            if owner is None:
                return False, None  # a group the checkpoint has no head for: unknown
        if owner is not None and owner not in ours:
            return True, None
        k = ours.index(owner) if owner is not None else 0
        return True, re.sub(pattern, repl, name).replace("{k}", str(k))
    return False, None


def convert_checkpoint(
    state_dict: Mapping[str, Tensor], aux_heads: Sequence[str] = (), out_indices: Sequence[int] = (0, 1, 2, 3),
    fed_loss: bool = False,
) -> Conversion:  # fmt: skip
    """Map every key of an authors' state dict (see the module docstring); nothing raises here, the result
    lists unknown keys. aux_heads: the aux heads of the target model (ModelConfig.co.aux_heads, any order;
    () = K 0); out_indices: the target backbone's (Swin `norm{i}` -> `out_norms`); fed_loss: the target model
    has FedLoss (ModelConfig.loss.fed_loss): keep the `fed_loss_weight` buffers, else drop them."""
    ours = group_order(list(aux_heads))  # our groups (repeats: the first group of a name takes its keys)
    theirs = tuple(h for h in AUX_ORDER if any(re.match(p, k) for p, _ in AUX_HEADS[h].checkpoint for k in state_dict))
    conv = Conversion(checkpoint_aux_heads=theirs)
    if any(k.startswith("backbone.stages.") for k in state_dict):
        conv.backbone_format = "swin-mmdet"
    elif any(k.startswith("backbone.layers.") for k in state_dict):
        conv.backbone_format = "swin-v1"
    elif any(k.startswith("backbone.blocks.") for k in state_dict):
        conv.backbone_format = "vit"
    for name, tensor in state_dict.items():
        if re.search(_EMA, name):
            conv.dropped_ema.append(name)
            continue
        if fed_loss and name.endswith(_FED_LOSS_WEIGHT):  # kept: our FedLoss modules hold the same buffer
            ours_name = name[: -len(_FED_LOSS_WEIGHT)] + ".fed_loss.fed_loss_weight"
            if ours_name.startswith("query_head."):
                fed_new: str | None = "head." + ours_name[len("query_head.") :]
            else:
                _, fed_new = _aux_name(ours_name, ours, theirs)
            if fed_new is None:
                conv.skipped_aux.append(name)
            else:
                conv.state[fed_new], conv.origin[fed_new] = tensor, name
            continue
        if any(re.search(p, name) for p in _DROPPED_BUFFERS):
            conv.dropped_buffers.append(name)
            continue
        fn: Transform | None = None
        if name == _HEAD_POS_EMBED:  # Co-Deformable (G, 1): one row per group, keep ours in our order
            groups = theirs or AUX_ORDER
            if not ours or any(h not in groups for h in ours):
                conv.skipped_aux.append(name)
                continue
            rows = [groups.index(h) for h in ours]
            conv.state["aux_query_proj.head_pos_embed.weight"] = tensor[rows]
            conv.origin["aux_query_proj.head_pos_embed.weight"] = name
            continue
        if name.startswith("backbone.") and conv.backbone_format == "vit":
            new = "backbone." + vit_block_leaf(name[len("backbone.") :])
        elif name.startswith("backbone."):
            new, fn = _backbone_name(name, out_indices)
        else:
            new = _deployed_name(name)
        if new is None:
            is_aux, new = _aux_name(name, ours, theirs)
            if is_aux and new is None:
                conv.skipped_aux.append(name)
                continue
        if new is None or new in conv.state:
            conv.unknown.append(name)
            continue
        conv.state[new] = fn(tensor) if fn is not None else tensor
        conv.origin[new] = name
    return conv


def fit_to_model(conv: Conversion, expected: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The converted state in the order and dtypes of `expected` (a model's state_dict), or a one-line
    ValueError naming the unknown, missing, unexpected and mis-shaped keys. `num_batches_tracked` counters the
    model has (trainable BatchNorm) but the converted state lacks are set to 0."""
    if conv.unknown:
        raise ValueError(unknown_keys_message(conv.unknown))
    state = dict(conv.state)
    for k, v in expected.items():
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = torch.zeros_like(v, device="cpu")
    missing = [k for k in expected if k not in state]
    unexpected = [f"{conv.origin.get(k, k)} -> {k}" for k in state if k not in expected]
    shapes = [f"{conv.origin.get(k, k)} {tuple(v.shape)} vs ours {tuple(expected[k].shape)}"
              for k, v in state.items() if k in expected and v.shape != expected[k].shape]  # fmt: skip
    if missing or unexpected or shapes:
        groups = ((missing, "missing in the checkpoint"), (unexpected, "not in the model"),
                  (shapes, "shape mismatch"))  # fmt: skip
        parts = [f"{len(x)} {what}: {listed(x, 5)}" for x, what in groups if x]
        raise ValueError("checkpoint does not fit the model config: " + "; ".join(parts))
    return {k: state[k].to(dtype=v.dtype) if v.is_floating_point() else state[k] for k, v in expected.items()}


def convert_official_state_dict(
    state_dict: Mapping[str, Tensor], aux_heads: Sequence[str] = (), out_indices: Sequence[int] = (0, 1, 2, 3)
) -> dict[str, Tensor]:
    """Authors' state dict (or a checkpoint dict with `state_dict`) -> ours (no model check: fit_to_model).

    aux_heads: the aux heads present in our model (e.g. ModelConfig.co.aux_heads); () drops every aux key.
    EMA copies and non-parameter buffers are dropped. Unknown keys raise a one-line ValueError.
    """
    sd = state_dict.get("state_dict", state_dict) if isinstance(state_dict, Mapping) else state_dict
    conv = convert_checkpoint(sd, aux_heads, out_indices)
    if conv.unknown:
        raise ValueError(unknown_keys_message(conv.unknown))
    return conv.state
