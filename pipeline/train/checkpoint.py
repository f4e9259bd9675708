"""Checkpoint directories: what a stage saves and what the next stage (or a resumed run) reads.

Layout (ARCHITECTURE.md contract), written to a local temp dir and handed to `ray.train.report`, which copies it
into the run's storage (local dir or s3://) only once it is complete:

    model.pt            model state dict (no DDP prefix)
    ema.pt              EMA model state dict (when EMA is on)
    optimizer.pt        optimizer state dict
    trainer_state.json  epoch, step, epoch_step, seen image ids of the running epoch, rng seeds, run ids
    config.yaml         the resolved job config
    categories.json     label -> category (id, name): lets a later stage remap the class head by name
    manifest.json       written last: {file name: {"size", "sha256"}} of every file above

Resume (`resumable_directory`) verifies a checkpoint before using it: the manifest is there, every file it lists
is present with its size and SHA-256, and model.pt loads. If the newest checkpoint fails, it falls back to the
previous one (Ray keeps `train.keep_checkpoints` >= 2) with a warning naming what was wrong. Ray Train commits a
checkpoint only after its upload returned (a failed upload raises in `ray.train.report` and is never registered),
so a half-written directory can only be a checkpoint Ray never offered; the manifest catches what the store
corrupted afterwards (a truncated object, a deleted file).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import torch

from pipeline import storage

MODEL = "model.pt"
EMA = "ema.pt"
OPTIMIZER = "optimizer.pt"
STATE = "trainer_state.json"
CONFIG = "config.yaml"
CATEGORIES = "categories.json"
MANIFEST = "manifest.json"


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
    write_manifest(directory)
    return directory


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: str) -> dict[str, dict[str, Any]]:
    """Write manifest.json (size and SHA-256 of every other file in the local `directory`). Returns it."""
    files = {n: {"size": os.path.getsize(os.path.join(directory, n)), "sha256": _sha256(os.path.join(directory, n))}
             for n in sorted(os.listdir(directory)) if n != MANIFEST and os.path.isfile(os.path.join(directory, n))}
    with open(os.path.join(directory, MANIFEST), "w") as f:
        json.dump({"files": files}, f, indent=1)
    return files


def verify_checkpoint(directory: str) -> str:
    """"" if the local checkpoint `directory` is whole, else what is wrong (one line)."""
    manifest = os.path.join(directory, MANIFEST)
    if not os.path.exists(manifest):
        return f"no {MANIFEST} (checkpoint incomplete or written before manifests)"
    try:
        with open(manifest) as f:
            files = json.load(f)["files"]
    except (ValueError, KeyError) as e:
        return f"{MANIFEST} unreadable: {e}"
    for name, want in files.items():
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            return f"{name} missing"
        size = os.path.getsize(path)
        if size != want["size"]:
            return f"{name} has {size} bytes, {want['size']} were written"
        if _sha256(path) != want["sha256"]:
            return f"{name} checksum differs from the one written at save time"
    if MODEL not in files:
        return f"{MODEL} not in {MANIFEST}"
    try:
        torch.load(os.path.join(directory, MODEL), map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # noqa: BLE001 - any load failure disqualifies the checkpoint
        return f"{MODEL} does not load: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return ""


@contextlib.contextmanager
def resumable_directory(checkpoint: Any, log: Callable[[str], None] = print) -> Iterator[str]:
    """A local copy of the newest checkpoint that verifies, starting at `checkpoint` (Ray's latest, a
    `ray.train.Checkpoint`) and going back through the older `checkpoint_*` directories beside it. Each one
    skipped is logged with its reason; deleted on exit. Raises RuntimeError if none verifies.

    Uses only `Checkpoint.path`, `.filesystem` (a pyarrow filesystem) and `.to_directory()`: public Ray API."""
    import pyarrow.fs as pafs

    fs, path = checkpoint.filesystem, checkpoint.path.rstrip("/")
    parent, newest = path.rsplit("/", 1) if "/" in path else ("", path)
    older = sorted((i.base_name for i in fs.get_file_info(pafs.FileSelector(parent or ".", allow_not_found=True))
                    if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")
                    and i.base_name < newest), reverse=True)
    problems: list[str] = []
    for name in [newest, *older]:
        local = tempfile.mkdtemp(prefix="codetr-resume-")
        try:
            type(checkpoint)(path=f"{parent}/{name}" if parent else name, filesystem=fs).to_directory(local)
            why = verify_checkpoint(local)
        except Exception as e:  # noqa: BLE001 - an unreadable checkpoint is one more fallback
            why = f"download failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if not why:
            if problems:
                log(f"[train] WARNING resuming from the older checkpoint {name}: " + "; ".join(problems))
            try:
                yield local
            finally:
                shutil.rmtree(local, ignore_errors=True)
            return
        shutil.rmtree(local, ignore_errors=True)
        problems.append(f"{name}: {why}")
    raise RuntimeError("no checkpoint of this run verifies: " + "; ".join(problems))


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
