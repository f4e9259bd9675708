"""Evaluation of a checkpoint or registered model on Ray workers (jobs/evaluate.py, the chain's evaluate stage).

    metrics = evaluate_on_ray("models:/codetr-coco@champion", job, tracking_uri=uri)   # Ray initialised

Data flow: the split's shards -> `build_dataset(train=False)` (the training run's eval pipeline: decode + eval
resize in CPU tasks) -> `map_batches(EvalActor)` on an actor pool, each actor one model replica (loaded by the
actor from the URI; 1 GPU each when the cluster has GPUs, bf16 autocast with fp32 post-processing; else one
CPU actor) -> one row per image with its top `eval.max_dets` detections as float32/int32 lists -> the driver
turns the rows into `Detections` arrays (no per-detection Python objects) and scores them with faster-coco-eval.
No split: Ray Data hands every row of the split to exactly one actor.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline.config import JobConfig, from_dict, to_dict
from pipeline.eval.coco_eval import default_max_dets
from pipeline.eval.detections import Detections

DETECTION_SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("boxes", pa.list_(pa.float32())),  # K*4 xyxy source pixels, K <= max_dets, highest score first
    ("scores", pa.list_(pa.float32())),
    ("labels", pa.list_(pa.int32())),   # contiguous model labels
])


def detections_to_table(dets: Detections) -> pa.Table:
    """Detections -> DETECTION_SCHEMA rows, one per image (list columns built from the flat arrays)."""
    offsets = pa.array(np.concatenate([[0], np.cumsum(dets.counts)]).astype(np.int32))
    return pa.table({
        "image_id": pa.array(dets.images, pa.int64()),
        "boxes": pa.ListArray.from_arrays(pa.array(offsets.to_numpy() * 4, pa.int32()),
                                          pa.array(dets.boxes.reshape(-1), pa.float32())),
        "scores": pa.ListArray.from_arrays(offsets, pa.array(dets.scores, pa.float32())),
        "labels": pa.ListArray.from_arrays(offsets, pa.array(dets.labels, pa.int32())),
    }, schema=DETECTION_SCHEMA)


def table_to_detections(table: pa.Table) -> Detections:
    """Inverse of `detections_to_table` (also over a concatenation of many such tables)."""
    if table.num_rows == 0:
        return Detections.empty()
    table = table.combine_chunks()
    counts = pc.list_value_length(table.column("scores")).to_numpy(zero_copy_only=False).astype(np.int32)

    def flat(name: str, dtype: Any) -> np.ndarray:
        return pc.list_flatten(table.column(name)).to_numpy(zero_copy_only=False).astype(dtype, copy=False)

    return Detections(table.column("image_id").to_numpy(zero_copy_only=False).astype(np.int64), counts,
                      flat("boxes", np.float32).reshape(-1, 4), flat("scores", np.float32),
                      flat("labels", np.int32))


class EvalActor:
    """One model replica (a Ray Data actor): AUGMENTED_SCHEMA rows (the eval pipeline's) -> DETECTION_SCHEMA."""

    def __init__(self, uri: str, job: dict[str, Any], tracking_uri: str | None, use_gpu: bool,
                 cpus: float = 1.0) -> None:
        from pipeline.eval.run import load_model_for_eval

        self.job = from_dict(JobConfig, job)
        if not use_gpu:
            torch.set_num_threads(max(1, int(cpus)))
        self.device = torch.device("cuda" if use_gpu else "cpu")
        model, _ = load_model_for_eval(uri, self.job, tracking_uri)
        self.model = model.to(self.device).eval()
        self.max_dets = default_max_dets(self.job.eval.protocol, self.job.eval.max_dets)

    @torch.no_grad()
    def __call__(self, table: pa.Table) -> pa.Table:
        from pipeline.data.collate import collate
        from pipeline.data.loader import table_to_samples
        from pipeline.eval.evaluator import forward_detections

        images, targets = table_to_samples(table)
        batch = collate(images, targets, size_divisor=self.job.data.size_divisor, device=self.device,
                        non_blocking=self.device.type == "cuda")
        preds = forward_detections(self.model, batch)
        ids = [int(t["image_id"]) for t in targets]
        return detections_to_table(Detections.from_predictions(zip(ids, preds), self.max_dets))


def eval_workers(job: JobConfig) -> tuple[int, bool]:
    """(actors, use_gpu): one per GPU of the cluster, at most `scaling.num_workers`; one CPU actor without GPUs."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus >= 1:
        return max(1, min(gpus, job.scaling.num_workers)), True
    return 1, False


def predict_on_ray(uri: str, job: JobConfig, split: str | None = None, tracking_uri: str | None = None,
                   workers: tuple[int, bool] | None = None) -> Detections:
    """Capped detections of every image of `split` (the first `eval.max_images` if > 0), predicted by Ray actors."""
    import ray.data

    from pipeline.data.loader import build_dataset

    split = split or job.data.val_split
    actors, use_gpu = workers or eval_workers(job)
    ds = build_dataset(job.data, split, train=False)
    if job.eval.max_images:
        ds = ds.limit(job.eval.max_images)
    cpus = job.scaling.cpus_per_worker
    ds = ds.map_batches(
        EvalActor, batch_size=job.eval.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=1 if use_gpu else 0,
        num_cpus=0 if use_gpu else cpus,
        fn_constructor_kwargs={"uri": uri, "job": to_dict(job), "tracking_uri": tracking_uri, "use_gpu": use_gpu,
                               "cpus": cpus},
    )
    tables = list(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    if not tables:
        return Detections.empty()
    return Detections.concat([table_to_detections(pa.concat_tables(tables))])


def evaluate_on_ray(uri: str, job: JobConfig, split: str | None = None, tracking_uri: str | None = None,
                    workers: tuple[int, bool] | None = None) -> dict[str, float]:
    """Box AP of the model at `uri` on `split` (default data.val_split), keys prefixed `<split>/`."""
    from pipeline.eval.evaluator import gt_from_shards, score

    split = split or job.data.val_split
    dets = predict_on_ray(uri, job, split, tracking_uri, workers)
    metrics = score(dets, gt_from_shards(job.data.shards, split), job.eval.protocol, job.eval.max_dets)
    return {f"{split}/{k}": v for k, v in metrics.items()}
