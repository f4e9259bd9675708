"""Evaluate a checkpoint or a registered model: COCO box AP (or LVIS rules) on a shard split.

    ray job submit --working-dir . -- python jobs/evaluate.py --model models:/codetr-coco@champion \
        --config configs/finetune_coco.yaml

    python jobs/evaluate.py --model .codetr/ray_results/finetune-coco/checkpoint_.../    # a checkpoint dir
    python jobs/evaluate.py --model models:/codetr-coco@latest --config configs/local/finetune_coco.yaml

`--config` names the data (shards or the synthetic set) and the evaluation protocol; the model comes from
`--model` (its own config.yaml for checkpoint directories). The model runs on Ray workers (one per GPU of the
cluster up to scaling.num_workers, bf16 autocast; one CPU worker without GPUs), never in this process; this process
scores the gathered detections. Prints the metrics as one JSON object last.
"""

import json

import _bootstrap  # noqa: F401  (must come first: makes `pipeline` the package)

from pipeline.cli import default_config, job_parser, load_job_config, run_main


def main() -> None:
    p = job_parser(__doc__, default_config("configs/local/finetune_coco.yaml"))
    p.add_argument("--model", required=True, help="checkpoint URI (dir or model.pt), runs:/... or models:/...")
    p.add_argument("--split", default=None, help="shard split (default: data.val_split)")
    args = p.parse_args()

    def run() -> None:
        from pipeline.eval.ray_eval import eval_workers, evaluate_on_ray
        from pipeline.tracking.mlflow_tracking import resolve_tracking_uri
        from pipeline.train.driver import ensure_shards, init_ray, work_path

        job = ensure_shards(load_job_config(args.config, args.overrides))
        tracking_uri = resolve_tracking_uri(job.tracking.tracking_uri, work_path(job))
        init_ray(job)
        actors, gpu = eval_workers(job)
        print(f"[eval] {args.model} on {actors} {'GPU' if gpu else 'CPU'} worker(s)")
        metrics = evaluate_on_ray(args.model, job, args.split, tracking_uri, (actors, gpu))
        for k, v in metrics.items():
            print(f"{k:>16s} {v:.4f}")
        print(json.dumps({"model": args.model, **metrics}))

    run_main(run)


if __name__ == "__main__":
    main()
