"""Loading a checkpoint or registered model for evaluation, and in-process evaluation on a shard split.

jobs/evaluate.py and the chain evaluate on Ray workers (`pipeline.eval.ray_eval.evaluate_on_ray`, which loads the
model with `load_model_for_eval` inside each actor); `evaluate_model` runs the same prediction and scoring in
this process (notebooks, and the reference the Ray path is tested against)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.config import JobConfig
from pipeline.eval.coco_eval import default_max_dets
from pipeline.eval.evaluator import gt_from_shards, predict_detections, score


def load_model_for_eval(uri: str, job: JobConfig, tracking_uri: str | None = None) -> tuple[nn.Module, list | None]:
    """`models:/...` / `runs:/...` (the logged module) or a checkpoint directory (built from `job.model`, or from
    the checkpoint's own config.yaml when present) -> (model in eval mode, its categories)."""
    if uri.startswith(("models:/", "runs:/")):
        from pipeline.tracking.mlflow_tracking import load_registered_model

        model = load_registered_model(uri, tracking_uri)
        return model, getattr(model, "categories", None)
    from pipeline.config import from_dict
    from pipeline.models import build_model
    from pipeline.train import checkpoint as ckpt_io

    directory = ckpt_io.checkpoint_dir_of(uri)
    text = ckpt_io.load_optional(directory, ckpt_io.CONFIG)
    model_cfg = job.model
    if text:
        import yaml

        model_cfg = from_dict(JobConfig, yaml.safe_load(text)).model
    model = build_model(model_cfg)
    model.load_state_dict(ckpt_io.load_model_state(uri, prefer_ema=job.train.ema))
    return model.eval(), ckpt_io.load_optional(directory, ckpt_io.CATEGORIES)


def evaluate_model(model: nn.Module, job: JobConfig, split: str | None = None, device: str = "cpu") -> dict[str, Any]:
    """Box AP of `model` on `split` (default: data.val_split) of `job.data.shards`, in this process."""
    from pipeline.data.collate import collate_samples
    from pipeline.data.loader import ShardDataset

    split = split or job.data.val_split
    ds = ShardDataset(job.data, split, train=False)
    n = len(ds) if not job.eval.max_images else min(len(ds), job.eval.max_images)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(n)), batch_size=job.eval.batch_size,
                                         collate_fn=lambda s: collate_samples(s, job.data.size_divisor))
    model.to(device)
    max_dets = default_max_dets(job.eval.protocol, job.eval.max_dets)
    dets = predict_detections(model, (b.to(device) for b in loader), max_dets)
    metrics = score(dets, gt_from_shards(job.data.shards, split), job.eval.protocol, job.eval.max_dets)
    return {f"{split}/{k}": v for k, v in metrics.items()}
