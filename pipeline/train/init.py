"""Seeding a stage from a previous one: weights from a checkpoint URI, an MLflow run or a registered model, with
the class-dependent parameters remapped by category name when the label space changes (365 -> 80 / 1203)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.models.aux_heads.table import class_param_keys
from pipeline.train import checkpoint as ckpt_io

# Substrings of the parameter names whose leading dimension is the class count (n, n+1 with background,
# 4n class-specific boxes): the query head's, then every aux head's from the head table. Only these are
# remapped; everything else must match in shape.
CLASS_PARAM_KEYS = ("cls_branches", "label_embedding", *class_param_keys())


def load_source(uri: str, tracking_uri: str | None = None) -> tuple[dict[str, torch.Tensor], list[dict] | None]:
    """(state dict, categories or None) from `models:/...`, `runs:/...` or a checkpoint directory / model.pt."""
    if uri.startswith(("models:/", "runs:/")):
        from pipeline.tracking.mlflow_tracking import load_registered_model

        model = load_registered_model(uri, tracking_uri)
        return model.state_dict(), getattr(model, "categories", None)
    directory = ckpt_io.checkpoint_dir_of(uri)
    return ckpt_io.load_model_state(uri), ckpt_io.load_optional(directory, ckpt_io.CATEGORIES)


def remap_rows(src: torch.Tensor, dst: torch.Tensor, index: list[int], group: int, extra: int) -> torch.Tensor:
    """Copy class rows of `src` into a copy of `dst`: class j of the new space takes class index[j] of the old one
    (-1: keep the fresh init). `group` rows per class (4 for class-specific box regression); `extra` trailing rows
    (1 for a background row) are copied as they are."""
    out = dst.detach().clone()
    for j, i in enumerate(index):
        if i >= 0:
            out[j * group:(j + 1) * group] = src[i * group:(i + 1) * group]
    if extra:
        out[-extra:] = src[-extra:]
    return out


def remap_state(
    src: dict[str, torch.Tensor], model: nn.Module, src_cats: list[dict] | None, dst_cats: list[dict]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A state dict for `model` built from `src`: equal shapes are copied; parameters whose leading dimension is
    the class count (n, n + 1 with background, 4 n class-specific boxes) are remapped by category name."""
    dst = model.state_dict()
    n_dst = len(dst_cats)
    names_src = [c["name"] for c in src_cats] if src_cats else None
    n_src = len(names_src) if names_src else None
    index = [names_src.index(c["name"]) if names_src and c["name"] in names_src else -1 for c in dst_cats]
    same_space = names_src == [c["name"] for c in dst_cats]
    out, remapped, fresh, missing = {}, [], [], []
    for key, value in dst.items():
        if key not in src:
            missing.append(key)
            out[key] = value
            continue
        s = src[key]
        is_class = any(k in key for k in CLASS_PARAM_KEYS)
        if s.shape == value.shape and (same_space or n_src is None or not is_class):
            out[key] = s
            continue
        if is_class and n_src is not None and s.ndim >= 1 and s.shape[1:] == value.shape[1:]:
            for group, extra in ((1, 0), (1, 1), (4, 0)):
                if s.shape[0] == n_src * group + extra and value.shape[0] == n_dst * group + extra:
                    out[key] = remap_rows(s, value, index, group, extra)
                    remapped.append(key)
                    break
            else:
                out[key], _ = value, fresh.append(key)
        else:
            out[key], _ = value, fresh.append(key)
    report = {"copied": len(out) - len(remapped) - len(fresh) - len(missing), "remapped_params": len(remapped),
              "classes_matched_by_name": sum(i >= 0 for i in index), "classes_fresh": sum(i < 0 for i in index),
              "fresh_params": fresh, "missing_in_source": len(missing)}
    return out, report


def init_weights(model: nn.Module, uri: str, categories: list[dict], tracking_uri: str | None = None) -> dict:
    """Load `uri` into `model` in place (class head remapped by category name). Returns a report of counts."""
    src, src_cats = load_source(uri, tracking_uri)
    state, report = remap_state(src, model, src_cats, categories)
    model.load_state_dict(state)
    return report
