"""Finetune Co-DINO on LVIS v1 from a pretrained stage (class head remapped 365 -> 1203 by category name;
LVIS box AP with its rules: AP_r / AP_c / AP_f, top-300 detections per image).

    ray job submit --working-dir . -- python jobs/finetune_lvis.py --config configs/finetune_lvis.yaml \
        --set init.from=models:/codetr-o365@latest

With no arguments it runs the embedded defaults (configs/local/finetune_lvis.yaml).
"""

import _bootstrap  # noqa: F401  (must come first: makes `pipeline` the package)

from pipeline.cli import stage_job

if __name__ == "__main__":
    stage_job(__doc__, "configs/local/finetune_lvis.yaml")
