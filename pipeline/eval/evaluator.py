"""Evaluation during training and from `jobs/evaluate.py`: every worker predicts its part of the val split
(bf16 autocast on GPU, fp32 post-processing), keeps the top `max_dets` detections per image and sends them as
NumPy arrays (`Detections`) to rank 0 only, which scores them against the ground truth read from the shards.

Every val image is predicted exactly once: the trainer splits "val" with `streaming_split(equal=False)`
(`pipeline.eval.val_split`); Ray Train's default `equal=True` drops rows to equalise the workers."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import dist as pcoll
from pipeline.eval.coco_eval import coco_gt_from_rows, default_max_dets, evaluate_boxes
from pipeline.eval.detections import Detections


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


def forward_detections(model: nn.Module, batch: Any, amp_dtype: torch.dtype | None | str = "auto"
                       ) -> list[dict[str, torch.Tensor]]:
    """The eval-mode model on one batch: list of B dicts boxes (K, 4) xyxy source pixels, scores (K,), labels (K,).

    On CUDA the network runs under bf16 autocast and the post-processing (sigmoid, top-k, box scaling, NMS)
    in fp32 on the outputs cast back to fp32; on the CPU everything runs in fp32: `CoDETR.predict(amp_dtype=...)`
    (tests/test_eval_scale.py checks that the CPU path equals `model(...)` exactly); modules without `predict`
    are called as they are, under the same autocast.
    `amp_dtype`: "auto" (bf16 on CUDA, none on CPU), None (fp32), or a dtype for autocast on the batch's device."""
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    images, masks, targets = batch.images, batch.masks, batch.targets
    kind = images.device.type
    dtype = (torch.bfloat16 if kind == "cuda" else None) if amp_dtype == "auto" else amp_dtype
    if hasattr(net, "predict") and hasattr(net, "image_sizes"):
        return net.predict(images, net.image_sizes(images, masks, targets, None), targets, amp_dtype=dtype)
    with torch.autocast(kind, dtype=dtype) if dtype is not None else contextlib.nullcontext():
        preds = net(images, masks, targets)
    return [{k: v.float() if v.is_floating_point() else v for k, v in p.items()} for p in preds]


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[Any], max_images: int = 0) -> list[tuple[int, dict[str, np.ndarray]]]:
    """(image_id, {boxes xyxy original pixels, scores, labels}) for every image of `batches` (the first
    `max_images` if > 0; the rest of `batches` is still consumed: streaming splits expect every consumer to
    finish)."""
    was_training = model.training
    model.eval()
    out: list[tuple[int, dict[str, np.ndarray]]] = []
    for batch in batches:
        if max_images and len(out) >= max_images:
            continue
        preds = forward_detections(model, batch)
        for t, p in zip(batch.targets, preds):
            if max_images and len(out) >= max_images:
                break
            out.append((int(t["image_id"]), {k: v.detach().cpu().numpy() for k, v in p.items()}))
    model.train(was_training)
    return out


def predict_detections(model: nn.Module, batches: Iterable[Any], max_dets: int, max_images: int = 0) -> Detections:
    """`predict`, capped to the top `max_dets` detections per image, as compact arrays (what a worker sends)."""
    return Detections.from_predictions(predict(model, batches, max_images), max_dets)


def score(predictions: Detections | list[tuple[int, dict[str, np.ndarray]]], gt: dict[str, Any], protocol: str,
          max_dets: int) -> dict[str, float]:
    """Box AP of the predicted images (the ground truth restricted to them)."""
    max_dets = default_max_dets(protocol, max_dets)
    dets = predictions if isinstance(predictions, Detections) else Detections.from_predictions(predictions)
    dets = dets.capped(max_dets)
    results = dets.coco_results([c["id"] for c in gt["categories"]])
    return evaluate_boxes(restrict_gt(gt, dets.images.tolist()), results, protocol, max_dets)


def evaluate_distributed(model: nn.Module, val_shard: Any, job: Any, categories: list[dict], shards_uri: str,
                         device: torch.device, rank: int, world: int,
                         detections_out: list | None = None) -> dict[str, float]:
    """Val AP with predictions from every worker; metrics (prefixed `val/`) returned on rank 0, {} elsewhere.

    Each worker caps its detections to `eval.max_dets` per image and sends them as arrays to rank 0 only.
    `detections_out`: rank 0 appends the gathered Detections to it (the eval pictures, pipeline/train/artifacts.py)."""
    dets = gather_detections(model, val_shard, job, device, world)
    if rank != 0 or dets is None:
        return {}
    if detections_out is not None:
        detections_out.append(dets)
    gt = gt_from_shards(shards_uri, job.data.val_split)
    metrics = score(dets, gt, job.eval.protocol, job.eval.max_dets)
    return {f"val/{k}": v for k, v in metrics.items()}


def gather_detections(model: nn.Module, val_shard: Any, job: Any, device: torch.device,
                      world: int) -> Detections | None:
    """Every worker's capped detections of its part of `val_shard`, concatenated on rank 0 (None elsewhere)."""
    from pipeline.data.loader import iter_batches

    batches = iter_batches(val_shard, job.eval.batch_size, device, size_divisor=job.data.size_divisor)
    per_worker = -(-job.eval.max_images // world) if job.eval.max_images else 0
    local = predict_detections(model, batches, default_max_dets(job.eval.protocol, job.eval.max_dets), per_worker)
    parts = pcoll.gather_objects(local, dst=0)  # rank 0 only; [local] outside a process group
    return None if parts is None else Detections.concat(parts)
