"""Batch inference on Ray Data: CPU tasks read + decode + resize, an actor pool of model replicas predicts.

    rows, skipped = predict_dataset(loaded, resolve_source(uri), batch_size=4, num_actors=2)

Data flow: image paths (or the shards' Parquet rows) -> `map_batches(decode_rows)` in Ray tasks of 1 CPU (read
the file from any storage, decode, eval transform) -> `map_batches(PredictActor)` on an ActorPoolStrategy of
`num_actors` actors (1 GPU each when the cluster has GPUs, else 1 CPU), `batch_size` images per forward ->
rows of detections in source pixels. An input that cannot be read or decoded becomes a row with `error` set:
it is passed through, counted and listed, never raised.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.inference.model_io import LoadedModel
from pipeline.inference.preprocess import BadImage, PreprocessConfig, decode_image_bytes
from pipeline.inference.sources import ImageSource

DECODED_SCHEMA = pa.schema([
    ("image_id", pa.int64()), ("path", pa.string()), ("image", pa.binary()),  # (3, h, w) uint8 network input
    ("height", pa.int32()), ("width", pa.int32()), ("orig_height", pa.int32()), ("orig_width", pa.int32()),
    ("scale_factor", pa.list_(pa.float32())), ("error", pa.string()),
])


def decode_rows(table: pa.Table, *, preprocess: dict[str, Any]) -> pa.Table:
    """Ray Data UDF (CPU task): rows with `image_id` and `path` (files) or `image` bytes (shards) ->
    DECODED_SCHEMA rows. Unreadable input -> a row with `error` and no image."""
    from pipeline import storage

    pre = PreprocessConfig.from_json(preprocess)
    out: dict[str, list[Any]] = {name: [] for name in DECODED_SCHEMA.names}
    for row in table.to_pylist():
        image_id = int(row["image_id"])
        path = row.get("path") or f"shard image {image_id}"
        image, target, error = b"", None, ""
        try:
            data = row["image"] if row.get("image") is not None else storage.read_bytes(path)
            pixels, target = pre.prepare(decode_image_bytes(data, path), image_id)
            image = pixels.contiguous().numpy().tobytes()
        except (BadImage, OSError) as e:  # FileNotFoundError, permission, network: skipped, counted, listed
            error = f"{type(e).__name__}: {e}".splitlines()[0]
        out["image_id"].append(image_id)
        out["path"].append(path)
        out["image"].append(image)
        out["error"].append(error)
        size = target["size"].tolist() if target else [0, 0]
        orig = target["orig_size"].tolist() if target else [0, 0]
        out["height"].append(size[0])
        out["width"].append(size[1])
        out["orig_height"].append(orig[0])
        out["orig_width"].append(orig[1])
        out["scale_factor"].append(target["scale_factor"].tolist() if target else [])
    return pa.table(out, schema=DECODED_SCHEMA)


class PredictActor:
    """One model replica (Ray Data actor): DECODED_SCHEMA batch -> one prediction row per image."""

    def __init__(self, loaded: LoadedModel, use_gpu: bool = False) -> None:
        from pipeline.inference.detector import Detector

        torch.set_num_threads(1) if not use_gpu else None
        self.detector = Detector(loaded, "cuda" if use_gpu else "cpu")

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = table.to_pylist()
        ok = [r for r in rows if not r["error"]]
        images = [np.frombuffer(r["image"], dtype=np.uint8).reshape(3, r["height"], r["width"]) for r in ok]
        targets = [{"image_id": r["image_id"], "size": torch.tensor([r["height"], r["width"]]),
                    "orig_size": torch.tensor([r["orig_height"], r["orig_width"]]),
                    "scale_factor": torch.tensor(r["scale_factor"], dtype=torch.float32)} for r in ok]
        dets = iter(self._predict(ok, images, targets))
        out = []
        for r in rows:
            d = next(dets) if not r["error"] else None
            if d is not None and "error" in d:
                r["error"], d = d["error"], None
            out.append({
                "image_id": r["image_id"], "path": r["path"], "width": r["orig_width"], "height": r["orig_height"],
                "boxes": d["boxes"].tolist() if d else [], "scores": d["scores"].tolist() if d else [],
                "labels": d["labels"].tolist() if d else [], "category_ids": d["category_ids"].tolist() if d else [],
                "category_names": list(d["category_names"]) if d else [], "error": r["error"],
            })
        return pa.Table.from_pylist(out)

    def _predict(self, rows: list[dict], images: list[np.ndarray], targets: list[dict]) -> list[dict[str, Any]]:
        """Detections of the batch; if the model rejects it (ValueError, e.g. an image too small for the
        number of queries), image by image, the rejected ones as {"error": ...}."""
        if not rows:
            return []
        try:
            return self.detector.predict_prepared(images, targets)
        except ValueError:
            pass
        out: list[dict[str, Any]] = []
        for r, im, t in zip(rows, images, targets):
            try:
                out.extend(self.detector.predict_prepared([im], [t]))
            except ValueError as e:
                out.append({"error": f"{r['path']}: {e}".splitlines()[0]})
        return out


def predict_dataset(loaded: LoadedModel, source: ImageSource, *, batch_size: int = 2, num_actors: int = 1,
                    decode_tasks: int = 2, use_gpu: bool | None = None,
                    progress: Callable[[int, int, float], None] | None = None
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Run the pipeline (Ray must be initialised). Returns (prediction rows, skipped inputs, stats)."""
    import ray
    import ray.data

    if batch_size < 1 or num_actors < 1 or decode_tasks < 1:
        raise ValueError(f"batch_size, num_actors and decode_tasks must be >= 1, got {batch_size}, {num_actors}, "
                         f"{decode_tasks}")
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    if source.kind == "files":
        ds = ray.data.from_items(source.items)
        total = len(source.items)
    else:
        from pipeline import storage

        fs, _ = storage.get_pyarrow_fs(source.shard_files[0])
        ds = ray.data.read_parquet([storage.split_uri(u)[1] for u in source.shard_files], filesystem=fs,
                                   columns=["image_id", "image"])
        total = 0
    ds = ds.map_batches(decode_rows, batch_size=batch_size, batch_format="pyarrow", num_cpus=1,
                        compute=ray.data.TaskPoolStrategy(size=decode_tasks),
                        fn_kwargs={"preprocess": loaded.preprocess.to_json()})
    ds = ds.map_batches(PredictActor, batch_size=batch_size, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=num_actors),
                        num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else 1,
                        fn_constructor_kwargs={"loaded": loaded, "use_gpu": use_gpu})
    rows, skipped = [], []
    t0 = time.perf_counter()
    t_first, n_first = None, 0
    for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        if t_first is None:  # pipeline start-up (workers, actors, model load) ends with the first result
            t_first, n_first = time.perf_counter(), table.num_rows
        for r in table.to_pylist():
            if r["error"]:
                skipped.append({"image_id": r["image_id"], "path": r["path"], "error": r["error"]})
            else:
                r.pop("error")
                rows.append(r)
        if progress is not None:
            progress(len(rows) + len(skipped), total, time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    stats = {"images": len(rows), "skipped": len(skipped), "seconds": round(seconds, 3),
             "images_per_s": round(len(rows) / seconds, 3) if seconds > 0 else 0.0,
             "startup_s": round((t_first or t0) - t0, 3),
             "images_per_s_after_first_batch": round((len(rows) + len(skipped) - n_first) / max(
                 1e-9, time.perf_counter() - (t_first or t0)), 3) if t_first else 0.0, "batch_size": batch_size,
             "num_actors": num_actors, "gpu": bool(use_gpu)}
    return rows, skipped, stats
