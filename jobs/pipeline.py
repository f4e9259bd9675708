"""The whole chain in one job: pretrain on Objects365 -> finetune on COCO (or LVIS) -> evaluate -> register.
Stages already finished (same run names, same work_dir) are skipped.

    ray job submit --working-dir . -- python jobs/pipeline.py \
        --pretrain-config configs/pretrain_o365.yaml --config configs/finetune_coco.yaml

With no arguments it runs the embedded defaults (configs/local/*.yaml: tiny model, synthetic data, local Ray,
SQLite MLflow under .codetr/) and prints the registered model's URI and its val AP.
`--set key=value` applies to every stage.
"""

import _bootstrap  # noqa: F401  (must come first: makes `pipeline` the package)

from pipeline.cli import default_config, job_parser, print_stage_result, run_main


def main() -> None:
    p = job_parser(__doc__, default_config("configs/local/finetune_coco.yaml"))
    p.add_argument("--pretrain-config", default=default_config("configs/local/pretrain_o365.yaml"))
    args = p.parse_args()

    def run() -> None:
        from pipeline.chain import run_chain

        results = run_chain(args.pretrain_config, args.config, args.overrides)
        for res in results:
            print_stage_result(res)
        final = results[-1]
        ap = final.metrics.get("registered/val/AP", final.metrics.get("val/AP", float("nan")))
        print(f"\nregistered model: {final.model_uri}  val AP: {ap:.4f}")

    run_main(run)


if __name__ == "__main__":
    main()
