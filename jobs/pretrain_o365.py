"""Pretrain Co-DINO on Objects365 (stage 1 of pretrain -> finetune) on Ray Train.

    ray job submit --working-dir . -- python jobs/pretrain_o365.py --config configs/pretrain_o365.yaml

With no arguments it runs the embedded defaults (configs/local/pretrain_o365.yaml): a local Ray instance, an
Objects365-like synthetic dataset generated once into .codetr/, shards in a local directory, the tiny model,
SQLite MLflow in .codetr/mlflow.db. It prints the checkpoint URI, the MLflow run and the registered model.

    python jobs/pretrain_o365.py --set train.max_steps=50 --set scaling.num_workers=2
"""

import _bootstrap  # noqa: F401  (must come first: makes `pipeline` the package)

from pipeline.cli import stage_job

if __name__ == "__main__":
    stage_job(__doc__, "configs/local/pretrain_o365.yaml")
