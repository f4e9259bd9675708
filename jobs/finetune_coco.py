"""Finetune Co-DINO on COCO from a pretrained stage (class head remapped 365 -> 80 by category name).

    ray job submit --working-dir . -- python jobs/finetune_coco.py --config configs/finetune_coco.yaml \
        --set init.from=models:/codetr-o365@latest

With no arguments it runs the embedded defaults (configs/local/finetune_coco.yaml: COCO-like synthetic data, the
tiny model, starting from `models:/codetr-o365@latest` in the local SQLite MLflow: run jobs/pretrain_o365.py first, or
jobs/pipeline.py which chains both).
"""

import _bootstrap  # noqa: F401  (must come first: makes `pipeline` the package)

from pipeline.cli import stage_job

if __name__ == "__main__":
    stage_job(__doc__, "configs/local/finetune_coco.yaml")
