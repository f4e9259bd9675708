"""Pretrain -> finetune -> evaluate -> register in one job, skipping stages already finished.

A finished stage leaves `<work_dir>/stages/<run name>.json` (its StageResult); re-running the chain reuses it.
The finetune stage starts from the pretrain stage's final checkpoint (class head remapped by category name).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from pipeline import storage
from pipeline.config import JobConfig, load_config, replace
from pipeline.train.driver import StageResult, run_stage, work_path


def stage_marker(job: JobConfig) -> str:
    return work_path(job, "stages", f"{job.run_name}.json")


def run_or_reuse(job: JobConfig) -> StageResult:
    marker = stage_marker(job)
    if os.path.exists(marker):
        res = StageResult(**storage.read_json(marker))
        print(f"[pipeline] stage {job.run_name} already finished: {res.checkpoint_uri} (delete {marker} to rerun)")
        return res
    res = run_stage(job)
    storage.write_json(marker, dataclasses.asdict(res))
    return res


def run_chain(pretrain_config: str, finetune_config: str, overrides: Sequence[str] = ()) -> list[StageResult]:
    pre = load_config(pretrain_config, overrides)
    fine = load_config(finetune_config, overrides)
    print(f"[pipeline] stage 1/3: pretrain ({pre.run_name})")
    r1 = run_or_reuse(pre)
    fine = replace(fine, **{"init.from_": r1.checkpoint_uri})
    print(f"[pipeline] stage 2/3: finetune ({fine.run_name}) from {r1.checkpoint_uri}")
    r2 = run_or_reuse(fine)
    print("[pipeline] stage 3/3: evaluate the registered model")
    if r2.model_uri:
        from pipeline.eval.ray_eval import evaluate_on_ray
        from pipeline.train.driver import ensure_shards, init_ray

        fine = ensure_shards(fine)
        init_ray(fine)  # both stages reused: Ray not started yet
        metrics = evaluate_on_ray(r2.model_uri, fine, tracking_uri=r2.tracking_uri)  # model on Ray workers
        r2.metrics.update({f"registered/{k}": v for k, v in metrics.items()})
        print(f"[pipeline] {r2.model_uri}: val AP {metrics[f'{fine.data.val_split}/AP']:.4f}")
    return [r1, r2]
