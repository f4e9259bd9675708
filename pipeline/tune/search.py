"""Ray Tune search over named job-config fields: each trial is a training stage (its own TorchTrainer).

    cfg = load_search("configs/local/tune_co_heads.yaml", ["search.num_samples=8"])
    result = run_search(cfg)
    print(result.table, result.best_checkpoint_uri)

How the parts fit (RAY_MLFLOW_NOTES.md, "Ray Tune with Train V2"):
- The driver validates the space and the cluster request, builds the shards once (trials would race), opens
  the MLflow parent run, then runs a `Tuner` whose trainable is `trial_main` with `{"CPU": 0.01}`: a light
  driver that calls `run_stage(job, register=False)`. That builds the trial's `TorchTrainer`, whose Train
  workers hold the real resources (`job.scaling`); Tune runs `max_concurrent` of them at once.
- `ReportToTune` (a Train callback) forwards rank 0's evaluation reports (`val/AP`, `step`, `epoch`,
  `checkpoint_path`) to Tune; ASHA stops trials on `metric` with `step` or `epoch` as time attribute. A
  stopped trial's driver actor exits, and with it the Train controller and workers it owns.
- Names make it resumable: the Tune experiment is `<storage>/tune/<search name>`, trial t's Train run is
  `<search name>-<trial id>` under `<experiment>/train`, its MLflow child run has the same name. Re-running a
  search of the same name restores the Tuner (`Tuner.restore`): finished trials stay finished, unfinished ones
  resume from their last Train checkpoint.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from pipeline import storage
from pipeline.config import (
    ConfigError,
    JobConfig,
    apply_overrides,
    deep_merge,
    from_dict,
    read_yaml,
    replace,
    to_dict,
)
from pipeline.tune.cleanup import CONTROLLER_KEY, ReleaseStoppedTrials, release_when_dead
from pipeline.tune.space import (
    SearchConfig,
    TuneJobConfig,
    apply_params,
    check_space,
    decode_params,
    to_tune_space,
    trial_run_name,
)

FIXED = ("train.max_steps", "train.epochs")  # set from the scheduler's max_t: a trial's length


@dataclass
class SearchResult:
    name: str
    rows: list[dict[str, Any]]  # one per trial, see pipeline.tune.results.trial_rows
    table: str  # the rows as printed
    best: dict[str, Any] | None  # the best trial's row
    best_config: JobConfig | None
    best_checkpoint_uri: str
    experiment_path: str  # Tune experiment directory (restore key)
    tracking_uri: str = ""
    parent_run_id: str = ""
    model_uri: str = ""
    wall_s: float = 0.0
    artifacts: dict[str, str] = field(default_factory=dict)  # local copies of the parent run's artefacts


# ------------------------------------------------------------------------------------------------------------
# loading


def load_search(path: str | None, overrides: Sequence[str] = ()) -> TuneJobConfig:
    """Defaults <- search YAML <- `--set` overrides (`search.num_samples=8`, `job.train.lr=1e-4`).

    `job:` is either a path to a job config (relative to the search file) or a partial job config, which may
    name a `base:` job config (relative to the search file) loaded first."""
    data = read_yaml(path) if path else {}
    here = os.path.dirname(path) if path else "."
    job = data.get("job", {})
    if isinstance(job, str):
        job = read_yaml(_relative(job, here))
    elif isinstance(job, dict) and "base" in job:
        job = dict(job)
        base = read_yaml(_relative(job.pop("base"), here))
        job = deep_merge(base, job)
    data = {**data, "job": job}
    data = apply_overrides(TuneJobConfig, data, overrides)
    return from_dict(TuneJobConfig, data)


def _relative(p: str, here: str) -> str:
    return p if os.path.isabs(p) or "://" in p else os.path.join(here, p)


# ------------------------------------------------------------------------------------------------------------
# checks before any trial


def check_cluster(probes: Sequence[JobConfig], search: SearchConfig, resources: dict[str, float]) -> None:
    """One-line error if one trial (its largest variant in the space), or `max_concurrent` of them, cannot fit
    the Ray cluster as it is now (Tune would wait forever on a trial that cannot be placed)."""
    workers = max(p.scaling.num_workers for p in probes)
    cpus = max(p.scaling.cpus_per_worker for p in probes)
    gpus = workers if any(p.scaling.use_gpu for p in probes) else 0
    have_cpu, have_gpu = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    if workers * cpus > have_cpu or gpus > have_gpu:
        raise ConfigError(
            f"one trial asks for {workers} workers x {cpus:g} CPU{f' + {gpus} GPUs' if gpus else ''} "
            f"but the Ray cluster has {have_cpu:g} CPUs, {have_gpu:g} GPUs"
        )
    concurrent = min(search.max_concurrent, search.num_samples)
    if concurrent * workers * cpus > have_cpu or concurrent * gpus > have_gpu:
        raise ConfigError(
            f"search.max_concurrent={concurrent} trials x ({workers} workers x {cpus:g} CPU"
            f"{f', {gpus} GPUs' if gpus else ''}) do not fit the Ray cluster ({have_cpu:g} CPUs, "
            f"{have_gpu:g} GPUs): lower search.max_concurrent or job.scaling"
        )


def trial_base_job(
    job: JobConfig, search: SearchConfig, storage_root: str, tracking_uri: str, experiment: str
) -> JobConfig:
    """The job every trial starts from: length from max_t, storage under the search, one MLflow store."""
    sched = search.scheduler
    if sched.time_attr == "step":  # each epoch has at least one step: max_t epochs always reach max_t steps
        length = {"train.max_steps": sched.max_t, "train.epochs": max(job.train.epochs, sched.max_t)}
    else:
        length = {"train.max_steps": 0, "train.epochs": sched.max_t}
    return replace(
        job,
        **length,
        storage_path=storage.join(storage_root, search.name, "train"),
        **{"tracking.tracking_uri": tracking_uri, "tracking.experiment": experiment},
    )


# ------------------------------------------------------------------------------------------------------------
# one trial (runs in a Tune trial actor)


class ReportToTune(TuneReportCallback):
    """Tune's forwarder of rank 0's reports, limited to those that carry `metric` (the evaluations).
    Mid-epoch checkpoint reports have no val AP and would fail Tune's check that every result names the
    search metric."""

    def __init__(self, metric: str) -> None:
        super().__init__()
        self.metric = metric

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if metrics and self.metric in metrics[0]:
            import ray  # runs in the Train controller; its actor id lets the driver free a stopped trial's PG

            rank0 = {**metrics[0], CONTROLLER_KEY: ray.get_runtime_context().get_actor_id()}
            super().after_report(run_context, [rank0, *metrics[1:]], checkpoint)


def trial_main(
    config: dict[str, Any], base_job: dict[str, Any], search: dict[str, Any], parent_run_id: str
) -> None:
    """Tune trainable: the trial's job = base job + sampled fields, trained as a stage (not registered)."""
    from ray import tune
    from ray.data import DataContext

    from pipeline.tracking import mlflow_tracking as mt
    from pipeline.train.driver import run_stage

    DataContext.get_current().enable_progress_bars = False  # the trial builds its datasets in this process
    # Trials start Train worker processes side by side; on a small or busy machine that can take longer than
    # Ray Train's 60 s worker-group startup timeout. Ray Train passes this variable on to the controller.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    s = from_dict(SearchConfig, search)
    trial_id = tune.get_context().get_trial_id()
    job = apply_params(from_dict(JobConfig, base_job), decode_params(s.space, config))
    job = replace(job, name=trial_run_name(s.name, trial_id))
    if job.tracking.enabled:  # created here so that run_stage reopens it (by name) already nested
        mt.get_or_create_run(
            job.tracking.tracking_uri,
            job.tracking.experiment,
            job.run_name,
            tags={
                "mlflow.parentRunId": parent_run_id,
                "search": s.name,
                "trial_id": trial_id,
                "dataset": job.dataset,
                "stage": job.stage,
            },
        )
    res = run_stage(job, register=False, callbacks=[ReportToTune(s.metric)])
    # A trial resumed after its Train run had already finished trains nothing and reports nothing: hand Tune
    # the final result (for a normal ending this repeats the last report at the same step).
    if s.metric in res.metrics:
        counters = {k: int(res.metrics[k]) for k in ("step", "epoch") if k in res.metrics}
        tune.report({**res.metrics, **counters, "checkpoint_path": res.checkpoint_uri})


def trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def trial_name(trial: Any) -> str:
    return str(trial.trial_id)


# ------------------------------------------------------------------------------------------------------------
# the search


def _search_alg(search: SearchConfig) -> Any:
    if search.algo == "optuna":
        try:
            import optuna  # noqa: F401
            from ray.tune.search.optuna import OptunaSearch
        except ImportError:
            raise ConfigError("search.algo=optuna needs the optuna package (pip install optuna)") from None
        return OptunaSearch(seed=search.seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=search.max_concurrent, random_state=search.seed)


def _scheduler(search: SearchConfig) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = search.scheduler
    if s.type == "fifo":
        return FIFOScheduler()
    # stop_last_trials=False: a trial that reaches max_t ends by itself (the Train run shuts down cleanly and
    # closes its MLflow run) instead of being stopped by the scheduler at its last report.
    return ASHAScheduler(
        time_attr=s.time_attr,
        max_t=s.max_t,
        grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
        stop_last_trials=False,
    )


def run_search(cfg: TuneJobConfig) -> SearchResult:
    """Validate, then run (or resume) the search; log the parent run's table, plot and best config."""
    import ray
    from ray import tune

    from pipeline.tracking import mlflow_tracking as mt
    from pipeline.train.driver import ensure_shards, init_ray, tracking_uri_of, with_manifest_classes, work_path
    from pipeline.tune import results

    t0 = time.time()
    job, search = cfg.job, cfg.search
    probes = check_space(job, search.space, fixed=FIXED)  # one-line errors before Ray starts
    init_ray(job)
    check_cluster([job, *probes], search, ray.cluster_resources())
    job = ensure_shards(job)  # once, on the driver: trials would race
    job = with_manifest_classes(job, storage.read_json(storage.join(job.data.shards, "manifest.json")))
    _check_val_split(job, search)

    storage_root = storage.join(job.storage_path or work_path(job, "ray_results"), "tune")
    tracking_uri, experiment, parent = "", "", ""
    if job.tracking.enabled:
        tracking_uri = tracking_uri_of(job)
        experiment = search.experiment or job.tracking.experiment or "codetr-tune"
        parent = mt.get_or_create_run(
            tracking_uri,
            experiment,
            search.name,
            tags={"search": search.name, "kind": "tune", "dataset": job.dataset},
        )
        results.log_search_inputs(tracking_uri, parent, cfg)
        print(f"[tune] MLflow parent run {parent} in experiment {experiment!r} at {tracking_uri}")
    base = trial_base_job(job, search, storage_root, tracking_uri, experiment)

    fs, root_path = None, storage_root
    if not storage.is_local(storage_root):
        fs, root_path = storage.get_pyarrow_fs(storage_root)
    else:
        os.makedirs(storage_root, exist_ok=True)
    experiment_path = os.path.join(root_path, search.name) if fs is None else f"{root_path}/{search.name}"
    trainable = tune.with_resources(
        tune.with_parameters(
            trial_main, base_job=to_dict(base), search=to_dict(search), parent_run_id=parent
        ),
        {"CPU": 0.01},
    )
    if tune.Tuner.can_restore(experiment_path, storage_filesystem=fs):
        print(f"[tune] resuming search {search.name!r} from {experiment_path} (unfinished trials continue)")
        tuner = tune.Tuner.restore(
            experiment_path,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=fs,
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=to_tune_space(search.space),
            tune_config=tune.TuneConfig(
                metric=search.metric,
                mode=search.mode,
                search_alg=_search_alg(search),
                scheduler=_scheduler(search),
                num_samples=search.num_samples,
                max_concurrent_trials=search.max_concurrent,
                trial_name_creator=trial_name,
                trial_dirname_creator=trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=search.name,
                storage_path=root_path,
                storage_filesystem=fs,
                verbose=1,
                callbacks=[ReleaseStoppedTrials()],
            ),
        )
    grid = tuner.fit()
    controllers = [r.metrics.get(CONTROLLER_KEY) for r in grid if r.metrics and r.metrics.get(CONTROLLER_KEY)]
    if release_when_dead(controllers, timeout_s=60.0):
        print("[tune] released the placement groups of stopped trials")

    rows = results.trial_rows(grid, search, base, storage_root)
    unfinished = [r["trial"] for r in rows if r["status"] == "unfinished"]
    if job.tracking.enabled:
        results.close_child_runs(tracking_uri, rows, search, experiment)
    best = results.best_row(rows, search)
    best_config = None
    if best is not None:
        best_config = replace(
            apply_params(base, best["params"]), name=trial_run_name(search.name, best["trial"])
        )
    out = SearchResult(
        search.name,
        rows,
        results.format_table(rows, search),
        best,
        best_config,
        best["checkpoint"] if best else "",
        experiment_path,
        tracking_uri,
        parent,
    )
    out.artifacts = results.write_artifacts(out, search, work_path(job, "tune", search.name))
    if unfinished:  # interrupted (Ctrl-C): leave the runs open; the same command resumes
        print(
            f"[tune] search interrupted with {len(unfinished)} unfinished trial(s): run the same command "
            f"again to resume them"
        )
    elif job.tracking.enabled:
        if search.register_best and best_config is not None and out.best_checkpoint_uri:
            out.model_uri = results.register_best(best_config, best, tracking_uri)
        out.wall_s = time.time() - t0
        results.log_parent(tracking_uri, parent, out, search)
    out.wall_s = time.time() - t0
    return out


def _check_val_split(job: JobConfig, search: SearchConfig) -> None:
    """The search metric comes from evaluations on the val split: without one no trial would ever report."""
    from pipeline.train.driver import has_split

    manifest = storage.read_json(storage.join(job.data.shards, "manifest.json"))
    split = job.data.val_split
    if not has_split(job, manifest, split):
        raise ConfigError(
            f"search.metric={search.metric} comes from evaluations, but the shards at {job.data.shards} have "
            f"no '{split}' split (job.data.val_split)"
        )
