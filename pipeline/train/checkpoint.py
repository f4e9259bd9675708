"""Checkpoint directories: what a stage saves and what the next stage (or a resumed run) reads.

Layout (ARCHITECTURE.md contract), written to a local temp dir and handed to `ray.train.report`, which copies it
into the run's storage (local dir or s3://) only once it is complete:

    model.pt            model state dict (no DDP prefix)
    ema.pt              EMA model state dict (when EMA is on)
    optimizer.pt        optimizer state dict
    trainer_state.json  epoch, step, epoch_step, seen image ids of the running epoch, rng seeds, run ids
    config.yaml         the resolved job config
    categories.json     label -> category (id, name): lets a later stage remap the class head by name
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import torch

from pipeline import storage

MODEL = "model.pt"
EMA = "ema.pt"
OPTIMIZER = "optimizer.pt"
STATE = "trainer_state.json"
CONFIG = "config.yaml"
CATEGORIES = "categories.json"


def save_checkpoint(
    directory: str,
    *,
    model_state: dict[str, torch.Tensor],
    trainer_state: dict[str, Any],
    config_yaml: str,
    categories: list[dict[str, Any]] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    ema_state: dict[str, torch.Tensor] | None = None,
) -> str:
    """Write a checkpoint into the local directory `directory` (created). Returns it."""
    os.makedirs(directory, exist_ok=True)
    torch.save(model_state, os.path.join(directory, MODEL))
    if ema_state is not None:
        torch.save(ema_state, os.path.join(directory, EMA))
    if optimizer_state is not None:
        torch.save(optimizer_state, os.path.join(directory, OPTIMIZER))
    with open(os.path.join(directory, STATE), "w") as f:
        json.dump(trainer_state, f)
    with open(os.path.join(directory, CONFIG), "w") as f:
        f.write(config_yaml)
    if categories is not None:
        with open(os.path.join(directory, CATEGORIES), "w") as f:
            json.dump(categories, f)
    return directory


def _load_torch(uri: str) -> Any:
    return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=False)


def checkpoint_dir_of(uri: str) -> str:
    """Accept a checkpoint directory or its model.pt; return the directory URI."""
    return uri.rsplit("/", 1)[0] if uri.rstrip("/").endswith(".pt") else uri.rstrip("/")


def load_model_state(uri: str, prefer_ema: bool = False) -> dict[str, torch.Tensor]:
    """Model weights from a checkpoint directory (or its model.pt), any storage URI."""
    directory = checkpoint_dir_of(uri)
    if prefer_ema and storage.exists(storage.join(directory, EMA)):
        return _load_torch(storage.join(directory, EMA))
    path = storage.join(directory, MODEL)
    if not storage.exists(path):
        raise FileNotFoundError(f"no {MODEL} in checkpoint {uri!r}")
    return _load_torch(path)


def load_optional(directory: str, name: str) -> Any | None:
    path = storage.join(directory, name)
    if not storage.exists(path):
        return None
    if name.endswith(".json"):
        return storage.read_json(path)
    if name.endswith(".yaml"):
        return storage.read_bytes(path).decode()
    return _load_torch(path)
