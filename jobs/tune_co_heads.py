"""Search the collaborative-training knobs (lambda1, lambda2, aux heads K) with Ray Tune: one TorchTrainer per
trial, ASHA early stopping on val AP, MLflow parent run + one child run per trial.

    ray job submit --working-dir . -- python jobs/tune_co_heads.py --config configs/tune_co_heads.yaml

With no arguments it runs the embedded defaults (configs/local/tune_co_heads.yaml): a local Ray instance, a
synthetic COCO-like set, the tiny model, 4 trials (2 at a time), SQLite MLflow in .codetr/mlflow.db. It prints
the results table, the best config and where the artefacts went. Re-running a search of the same name resumes
it (unfinished trials continue from their last checkpoint); `--set search.name=...` starts a new one.

    python jobs/tune_co_heads.py --set search.num_samples=8 --set search.algo=optuna
    python jobs/tune_co_heads.py --set job.train.lr=1e-4 \
        --set 'search.space={model.co.lambda1: {type: loguniform, lower: 0.5, upper: 2}}'
"""

import _bootstrap  # noqa: F401  (must come first: makes `pipeline` the package)

from pipeline.cli import default_config, job_parser, run_main
from pipeline.config import flatten


def main(argv: list[str] | None = None) -> None:
    args = job_parser(__doc__, default_config("configs/local/tune_co_heads.yaml")).parse_args(argv)

    def body() -> None:
        from pipeline.tune.search import load_search, run_search

        cfg = load_search(args.config, args.overrides)
        res = run_search(cfg)
        stopped = sum(r["stopped_early"] for r in res.rows)
        print("")
        print(
            f"search {res.name}: {len(res.rows)} trials, {stopped} stopped early by ASHA, "
            f"{res.wall_s / 60:.1f} min"
        )
        print(res.table)
        print("")
        if res.best is not None and res.best_config is not None:
            best = flatten(res.best_config)
            print(
                f"best trial:   {res.best['trial']}  {cfg.search.metric} = "
                f"{res.best['AP' if cfg.search.metric == 'val/AP' else cfg.search.metric]:.4f}"
            )
            print("best config:  " + ", ".join(f"{k}={best[k]}" for k in cfg.search.space))
            print(f"checkpoint:   {res.best_checkpoint_uri}")
            print(f"full config:  {res.artifacts.get('best_config.yaml', '')}")
        else:
            print("no trial reported a result")
        print(f"results:      {res.artifacts.get('results.csv', '')}")
        print(f"plot:         {res.artifacts.get('ap_vs_lambda.png', '')}")
        print(f"tune dir:     {res.experiment_path}")
        if res.parent_run_id:
            print(f"mlflow:       {res.tracking_uri} parent run_id={res.parent_run_id}")
        if res.model_uri:
            print(f"registered:   {res.model_uri}")

    run_main(body)


if __name__ == "__main__":
    main()
