"""Register a finished stage's checkpoint in the MLflow model registry (when registration at the end of the stage
failed, e.g. the tracking server was away: the stage's error names the checkpoint and this command).

    ray job submit --working-dir . -- python jobs/register.py \
        --checkpoint s3://bucket/ray_results/pretrain-o365/checkpoint_2026-01-01_00-00-00.000000

    python jobs/register.py --checkpoint .codetr/ray_results/pretrain-o365/checkpoint_... \
        [--tracking-uri http://mlflow:5000] [--name codetr-o365]

The model config, categories, MLflow run id and best val AP come from the checkpoint (config.yaml,
categories.json, trainer_state.json); the tracking URI from --tracking-uri, else the checkpoint's config, else
$MLFLOW_TRACKING_URI. Prints the registered model URI.
"""

import argparse

import _bootstrap  # noqa: F401  (must come first: makes `pipeline` the package)

from pipeline.cli import run_main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory URI (or its model.pt)")
    p.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default: the checkpoint's config)")
    p.add_argument("--name", default="", help="registered model name (default: the checkpoint's config)")
    args = p.parse_args()

    def run() -> None:
        from pipeline.train.driver import register_checkpoint

        res = register_checkpoint(args.checkpoint, args.tracking_uri, args.name)
        print(f"registered:  {res.model_uri} (run {res.mlflow_run_id} at {res.tracking_uri}"
              f"{', alias champion' if res.champion else ''})")

    run_main(run)


if __name__ == "__main__":
    main()
