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

Resume (`resumable_directory`) takes the newest checkpoint directory of the run that verifies: the manifest is
there, every file it lists is present with its size and SHA-256, and model.pt loads. Candidates are every
`checkpoint_*` directory of the run, newest first: Ray's latest registered one, older ones (Ray keeps
`train.keep_checkpoints` >= 2) when it is corrupt, and newer ones whose worker was lost after the upload but
before Ray's controller took its report. Each one skipped is logged with what was wrong. A failed upload raises in
`ray.train.report` and is never registered, so a half-written directory is one Ray never offered or one its
worker died uploading; the manifest catches those and what the store corrupted afterwards (a truncated object, a
deleted file).
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


def run_checkpoint_names(fs: Any, run_dir: str) -> list[str]:
    """Names of the `checkpoint_*` directories in the run directory `run_dir` of the pyarrow filesystem `fs`,
    newest first. Ray Train names them `checkpoint_<UTC timestamp>` (`%Y-%m-%d_%H-%M-%S.%f`), so name order is
    time order; Ray's `checkpoint_manager_snapshot.json` beside them is a file and is left out."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(run_dir or ".", allow_not_found=True))
    return sorted((i.base_name for i in infos if i.type == pafs.FileType.Directory
                   and i.base_name.startswith("checkpoint_")), reverse=True)


@contextlib.contextmanager
def resumable_directory(checkpoint: Any | None, log: Callable[[str], None] = print,
                        run_dir: tuple[Any, str] | None = None) -> Iterator[str | None]:
    """A local copy of the newest checkpoint of the run that verifies, or None when the run has none.

    `checkpoint` is Ray's latest registered checkpoint (`ray.train.get_checkpoint()`, a `ray.train.Checkpoint`)
    or None; `run_dir` is (pyarrow filesystem, path) of the run directory, by default the one holding
    `checkpoint`. Every `checkpoint_*` directory there is a candidate, newest first, not only those up to Ray's
    latest: a worker uploads its checkpoint and only then queues the report that Ray's controller polls (every
    2 s), so a node lost in between leaves a complete checkpoint that Ray never registered; resuming from it
    trains nothing twice. Completeness is the manifest's to judge (a half-uploaded directory fails it). Each one
    skipped is logged with its reason; the copy is deleted on exit. Raises RuntimeError when Ray had registered a
    checkpoint and none verifies; when Ray had none, unverifiable leftovers are logged and the run starts anew.

    Uses only `Checkpoint.path`, `.filesystem` (a pyarrow filesystem) and `.to_directory()`: public Ray API."""
    from ray.train import Checkpoint

    if run_dir is None:
        if checkpoint is None:
            raise ValueError("resumable_directory needs Ray's checkpoint or the run directory")
        path = checkpoint.path.rstrip("/")
        run_dir = (checkpoint.filesystem, path.rsplit("/", 1)[0] if "/" in path else "")
    fs, parent = run_dir
    registered = checkpoint.path.rstrip("/").rsplit("/", 1)[-1] if checkpoint is not None else None
    names = run_checkpoint_names(fs, parent)
    if registered is not None and registered not in names:
        names = sorted([*names, registered], reverse=True)
    problems: list[str] = []
    for name in names:
        local = tempfile.mkdtemp(prefix="codetr-resume-")
        try:
            Checkpoint(path=f"{parent}/{name}" if parent else name, filesystem=fs).to_directory(local)
            why = verify_checkpoint(local)
        except Exception as e:  # noqa: BLE001 - an unreadable checkpoint is one more fallback
            why = f"download failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if not why:
            if registered is None or name > registered:
                log(f"[train] resuming from {name}, a complete checkpoint Ray had not registered "
                    f"(Ray's latest: {registered or 'none'}; its worker was lost between upload and report)")
            if problems:
                log(f"[train] WARNING resuming from the older checkpoint {name}: " + "; ".join(problems))
            try:
                yield local
            finally:
                shutil.rmtree(local, ignore_errors=True)
            return
        shutil.rmtree(local, ignore_errors=True)
        problems.append(f"{name}: {why}")
    if registered is not None:
        raise RuntimeError("no checkpoint of this run verifies: " + "; ".join(problems))
    if problems:
        log("[train] WARNING starting anew: no checkpoint of this run verifies: " + "; ".join(problems))
    yield None


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
