"""The loaded-model record and the deployed (K = 0) form of a trained model (loading from any URI:
`pipeline.inference.load.load_for_inference`, which sits above the MLflow and evaluation code it dispatches to).

A deployed directory (what the MLflow pyfunc ships, `save_deployed` / `load_deployed`):
    model.pt          the deployed CoDETR module (aux heads, adapter and aux projections removed), pickled
    categories.json   label -> {"id", "name"} in label order
    preprocess.json   PreprocessConfig: eval transform, eval size, size divisor
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline.inference.preprocess import PreprocessConfig

MODEL, CATEGORIES, PREPROCESS = "model.pt", "categories.json", "preprocess.json"


@dataclass
class LoadedModel:
    """A model in eval mode with what is needed to feed it and name its labels."""

    model: nn.Module
    categories: list[dict[str, Any]] = field(default_factory=list)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    source: str = ""

    def category_name(self, label: int) -> str:
        return str(self.categories[label]["name"]) if 0 <= label < len(self.categories) else str(label)

    def category_id(self, label: int) -> int:
        return int(self.categories[label]["id"]) if 0 <= label < len(self.categories) else int(label)


def deployed_model(model: nn.Module) -> nn.Module:
    """A copy of a CoDETR without its training-only parts (aux heads, adapter, aux query projections): the
    model that inference runs, whose state dict is `model.inference_state_dict()`. `model` is not changed."""
    import copy

    parts = {name: getattr(model, name, None) for name in ("aux_heads", "adapter", "aux_query_proj")}
    try:
        model.aux_heads = nn.ModuleList()
        model.adapter = None
        model.aux_query_proj = None
        out = copy.deepcopy(model)
    finally:
        for name, value in parts.items():
            setattr(model, name, value)
    for key in ("categories",):
        if hasattr(model, key):
            setattr(out, key, getattr(model, key))
    return out.eval()


def save_deployed(directory: str, model: nn.Module, categories: list[dict[str, Any]] | None,
                  preprocess: PreprocessConfig) -> str:
    """Write the deployed form of `model` into the local `directory` (created). Returns it."""
    os.makedirs(directory, exist_ok=True)
    torch.save(deployed_model(model), os.path.join(directory, MODEL))
    with open(os.path.join(directory, CATEGORIES), "w") as f:
        json.dump(list(categories or []), f)
    with open(os.path.join(directory, PREPROCESS), "w") as f:
        json.dump(preprocess.to_json(), f)
    return directory


def load_deployed(directory: str, source: str = "") -> LoadedModel:
    """Inverse of `save_deployed`."""
    model = torch.load(os.path.join(directory, MODEL), map_location="cpu", weights_only=False)
    with open(os.path.join(directory, CATEGORIES)) as f:
        categories = json.load(f)
    with open(os.path.join(directory, PREPROCESS)) as f:
        preprocess = PreprocessConfig.from_json(json.load(f))
    model.categories = categories
    return LoadedModel(model.eval(), categories, preprocess, source or directory)
