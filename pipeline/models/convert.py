"""Authors' Co-DINO checkpoints (Sense-X mmdet 2.x and mmdet 3.x ports, same names) -> our module names.

    sd = torch.load("co_dino_5scale_r50_1x_coco.pth", map_location="cpu")
    model.load_state_dict(convert_official_state_dict(sd, aux_heads=()), strict=True)   # deployed (K = 0)

Name tables (CO_DETR_SPEC.md 8.2). Deployed part:
  backbone.X                                         -> backbone.body.X          (ResNet; no `fc`)
  neck.*                                             -> neck.*                   (same names)
  query_head.transformer.{level_embeds,enc_output,enc_output_norm,query_embed} -> transformer.*
  query_head.transformer.encoder.layers.i.attentions.0.*   -> transformer.encoder.layers.i.self_attn.*
                                          .ffns.0.layers.0.0.* / .ffns.0.layers.1.* -> .ffn.linear1.* / .ffn.linear2.*
                                          .norms.{0,1}.*    -> .norm{1,2}.*
  query_head.transformer.decoder.layers.i.attentions.0.attn.* -> transformer.decoder.layers.i.self_attn.*
                                          .attentions.1.*   -> .cross_attn.*;  .norms.{0,1,2} -> .norm{1,2,3}
  query_head.transformer.decoder.{ref_point_head,norm}.*     -> transformer.decoder.*
  query_head.{cls_branches,reg_branches}.*           -> head.*
  query_head.label_embedding.weight | query_head.dn_generator.label_embedding.weight
                                                     -> denoising.label_embedding.weight
Training-only auxiliary part: AUX_KEY_MAP below (filled as the aux modules are named); with `aux_heads=()`
every auxiliary key is dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from torch import Tensor

_QH = "query_head.transformer."

# (regex on the authors' name, replacement) for the deployed part, tried in order.
DEPLOYED_RULES: list[tuple[str, str]] = [
    (r"^backbone\.(.*)$", r"backbone.body.\1"),
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
]
_NORM_RULE = re.compile(r"^(transformer\.(?:encoder|decoder)\.layers\.\d+\.)norms\.(\d)\.(.*)$")

# ---------------------------------------------------------------------------------------------------------
# AUXILIARY KEYS (training-only). Filled by the aux modules' naming; `{atss}` / `{faster_rcnn}` are replaced by
# the head's index in `CoDETR.aux_heads` (authors' order: Faster R-CNN first, then ATSS).
AUX_KEY_MAP: dict[str, str] = {
    r"^query_head\.transformer\.aux_pos_trans\.(\d+)\.(.*)$": r"aux_query_proj.aux_pos_trans.\1.\2",
    r"^query_head\.transformer\.aux_pos_trans_norm\.(\d+)\.(.*)$": r"aux_query_proj.aux_pos_trans_norm.\1.\2",
    r"^query_head\.downsample\.(.*)$": r"adapter.downsample.\1",
    r"^bbox_head\.0\.(.*)$": r"aux_heads.{atss}.\1",
    r"^rpn_head\.(.*)$": r"aux_heads.{faster_rcnn}.rpn_head.\1",
    r"^roi_head\.0\.(.*)$": r"aux_heads.{faster_rcnn}.roi_head.\1",
}
_AUX_OWNER = {  # which aux head a key belongs to (None: shared aux parts, present whenever K > 0)
    r"^bbox_head\.": "atss",
    r"^rpn_head\.": "faster_rcnn",
    r"^roi_head\.": "faster_rcnn",
}
_IGNORED = (r"^ema_", r"\.num_batches_tracked$", r"\.fed_loss_weight$")


def _deployed_name(name: str) -> str | None:
    for pattern, repl in DEPLOYED_RULES:
        if re.match(pattern, name):
            new = re.sub(pattern, repl, name)
            m = _NORM_RULE.match(new)
            return f"{m.group(1)}norm{int(m.group(2)) + 1}.{m.group(3)}" if m else new
    return None


def _aux_name(name: str, aux_heads: Sequence[str]) -> tuple[bool, str | None]:
    """(is an aux key, our name or None when that part is absent from the model)."""
    for pattern, repl in AUX_KEY_MAP.items():
        if re.match(pattern, name):
            if not aux_heads:
                return True, None
            owner = next((h for p, h in _AUX_OWNER.items() if re.match(p, name)), None)
            if owner is not None and owner not in aux_heads:
                return True, None
            order = [h for h in ("faster_rcnn", "atss") if h in aux_heads]
            fmt = {h: str(order.index(h)) if h in order else "x" for h in ("faster_rcnn", "atss")}
            return True, re.sub(pattern, repl, name).format(**fmt)
    return False, None


def convert_official_state_dict(
    state_dict: Mapping[str, Tensor], aux_heads: Sequence[str] = ()
) -> dict[str, Tensor]:
    """Authors' state dict (or a checkpoint dict with `state_dict`) -> ours.

    aux_heads: the aux heads present in our model (e.g. ModelConfig.co.aux_heads); () drops every aux key.
    EMA copies, `num_batches_tracked` and FedLoss buffers are dropped. Unknown keys raise a ValueError.
    """
    sd = state_dict.get("state_dict", state_dict) if isinstance(state_dict, Mapping) else state_dict
    out: dict[str, Tensor] = {}
    unknown = []
    for name, tensor in sd.items():
        if any(re.search(p, name) for p in _IGNORED):
            continue
        ours = _deployed_name(name)
        if ours is None:
            is_aux, ours = _aux_name(name, aux_heads)
            if is_aux and ours is None:
                continue
        if ours is None:
            unknown.append(name)
            continue
        out[ours] = tensor
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" ... (+{len(unknown) - 8})" if len(unknown) > 8 else "")
        raise ValueError(f"{len(unknown)} checkpoint key(s) with no known mapping: {shown}")
    return out
