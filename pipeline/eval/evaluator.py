"""Evaluation during training and from `jobs/evaluate.py`: every worker predicts its part of the val split,
predictions are gathered on rank 0, which scores them against the ground truth read from the shards."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import dist as pcoll
from pipeline.eval.coco_eval import coco_gt_from_rows, detections_to_coco, evaluate_boxes


@functools.lru_cache(maxsize=4)
def gt_from_shards(shards_uri: str, split: str) -> dict[str, Any]:
    """COCO-format ground truth of `split`, read from the Parquet shards (image bytes not read)."""
    import pyarrow.dataset as pads

    from pipeline import storage

    manifest = storage.read_json(storage.join(shards_uri, "manifest.json"))
    fs, path = storage.get_pyarrow_fs(storage.join(shards_uri, split))
    ds = pads.dataset(path, filesystem=fs, format="parquet")
    wanted = [c for c in ("image_id", "file_name", "width", "height", "boxes", "labels", "iscrowd",
                          "neg_category_ids", "not_exhaustive_category_ids") if c in ds.schema.names]
    rows = ds.to_table(columns=wanted).to_pylist()
    return coco_gt_from_rows(rows, manifest["categories"])


def restrict_gt(gt: dict[str, Any], image_ids: Iterable[int]) -> dict[str, Any]:
    """The ground truth of the given images only (the images that were actually predicted)."""
    keep = set(int(i) for i in image_ids)
    return {**gt, "images": [im for im in gt["images"] if im["id"] in keep],
            "annotations": [a for a in gt["annotations"] if a["image_id"] in keep]}


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[Any], max_images: int = 0) -> list[tuple[int, dict[str, np.ndarray]]]:
    """(image_id, {boxes xyxy original pixels, scores, labels}) for every image of `batches`."""
    was_training = model.training
    model.eval()
    out: list[tuple[int, dict[str, np.ndarray]]] = []
    for batch in batches:  # consumed to the end even past max_images: streaming splits expect every consumer to
        if max_images and len(out) >= max_images:  # finish
            continue
        preds = model(batch.images, batch.masks, batch.targets)
        for t, p in zip(batch.targets, preds):
            out.append((int(t["image_id"]), {k: v.detach().float().cpu().numpy() for k, v in p.items()}))
    model.train(was_training)
    return out


def score(predictions: list[tuple[int, dict[str, np.ndarray]]], gt: dict[str, Any], protocol: str,
          max_dets: int) -> dict[str, float]:
    cat_ids = [c["id"] for c in gt["categories"]]
    ids = [i for i, _ in predictions]
    dets = detections_to_coco([p for _, p in predictions], ids, cat_ids)
    return evaluate_boxes(restrict_gt(gt, ids), dets, protocol, max_dets)


def evaluate_distributed(model: nn.Module, val_shard: Any, job: Any, categories: list[dict], shards_uri: str,
                         device: torch.device, rank: int, world: int) -> dict[str, float]:
    """Val AP with predictions from every worker; metrics (prefixed `val/`) returned on rank 0, {} elsewhere."""
    from pipeline.data.loader import iter_batches

    batches = iter_batches(val_shard, job.eval.batch_size, device, size_divisor=job.data.size_divisor)
    per_worker = job.eval.max_images // world if job.eval.max_images else 0
    local = predict(model, batches, per_worker)
    parts = pcoll.gather_objects(local, dst=0) if world > 1 else [local]  # to rank 0 only
    if rank != 0 or parts is None:
        return {}
    local = [p for part in parts for p in part]
    gt = gt_from_shards(shards_uri, job.data.val_split)
    metrics = score(local, gt, job.eval.protocol, job.eval.max_dets)
    return {f"val/{k}": v for k, v in metrics.items()}
