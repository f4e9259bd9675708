"""The stage driver: data -> TorchTrainer -> evaluation -> MLflow registry. Called by the `jobs/*.py` scripts.

    result = run_stage(load_config("configs/local/pretrain_o365.yaml"))
    print(result.checkpoint_uri, result.metrics["val/AP"], result.model_uri)
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from typing import Any

from pipeline import storage
from pipeline.config import JobConfig, dump_yaml, flatten, load_config, to_dict
from pipeline.dist import torch_backend
from pipeline.retry import RETRY, call_with_retries


class StageError(RuntimeError):
    """Bad input detected before training starts (one-line message)."""


class RegistrationError(StageError):
    """Training finished but registering its model failed after the retries of `pipeline.retry`; the message
    names the checkpoint and the `jobs/register.py` line that registers it later."""


@dataclass
class StageResult:
    run_name: str
    checkpoint_uri: str
    metrics: dict[str, float]
    mlflow_run_id: str = ""
    tracking_uri: str = ""
    registered_name: str = ""
    registered_version: int = 0
    model_uri: str = ""
    champion: bool = False


def work_path(job: JobConfig, *parts: str) -> str:
    return os.path.join(os.path.abspath(job.work_dir), *parts)


def ensure_shards(job: JobConfig) -> JobConfig:
    """With `data.shards` empty, generate the synthetic dataset (once) and build its shards in the work dir."""
    if job.data.shards:
        if not storage.exists(storage.join(job.data.shards, "manifest.json")):
            raise StageError(f"no manifest.json under data.shards={job.data.shards!r}: build shards first "
                             f"(jobs/build_shards.py) or leave data.shards empty for the synthetic set")
        return job
    from pipeline.data.shards import build_shards
    from pipeline.data.synthetic import SyntheticConfig as GenConfig
    from pipeline.data.synthetic import generate_dataset

    s = job.synthetic
    tag = f"{s.style}-c{s.classes}-n{s.images}-v{s.val_images}-s{s.seed}-{s.image_size[0]}x{s.image_size[1]}"
    src = work_path(job, "data", tag)
    shards = work_path(job, "shards", tag)
    if not storage.exists(storage.join(shards, "manifest.json")):
        print(f"[data] generating synthetic {s.style} dataset ({s.images} train / {s.val_images} val images, "
              f"{s.classes} classes) in {src}")
        gen = GenConfig(style=s.style, classes=s.classes, images=s.images, val_images=s.val_images, seed=s.seed,
                        image_size=s.image_size)
        generated = generate_dataset(src, gen)
        for split, paths in generated.splits.items():
            build_shards(paths.annotations, paths.images, shards, split=split)
    print(f"[data] shards: {shards}")
    return dataclasses.replace(job, data=dataclasses.replace(job.data, shards=shards))


def local_ray_cpus() -> int:
    """Logical CPUs of the local Ray instance a job starts when it finds no cluster (overcommitted 2x, >= 4)."""
    return max(4, (os.cpu_count() or 2) * 2)


def check_feasible(job: JobConfig, resources: dict[str, float] | None = None) -> None:
    """One-line error if the requested workers cannot fit the Ray cluster (Ray would wait forever).

    `resources`: the cluster's total resources; default `ray.cluster_resources()` (Ray must be initialised)."""
    if job.scaling.num_workers < 1:
        raise StageError(f"scaling.num_workers must be >= 1, got {job.scaling.num_workers}")
    if resources is None:
        import ray

        resources = ray.cluster_resources()
    need_cpu = job.scaling.num_workers * job.scaling.cpus_per_worker
    if need_cpu > resources.get("CPU", 0):
        raise StageError(f"scaling asks for {job.scaling.num_workers} workers x {job.scaling.cpus_per_worker} CPU = "
                         f"{need_cpu:g} CPUs but the Ray cluster has {resources.get('CPU', 0):g}")
    if job.scaling.use_gpu and job.scaling.num_workers > resources.get("GPU", 0):
        raise StageError(f"scaling asks for {job.scaling.num_workers} GPU workers but the Ray cluster has "
                         f"{resources.get('GPU', 0):g} GPUs")


def validate_inputs(job: JobConfig) -> None:
    """Checks that need neither Ray nor torch, run first: bad input fails in one line within seconds (unreachable
    or missing shards / storage, a missing init checkpoint or registered model, workers that cannot fit the
    local Ray instance the job would start)."""
    if job.data.shards:
        manifest = storage.join(job.data.shards, "manifest.json")
        storage.check_reachable(manifest)
        if not storage.exists(manifest):
            raise StageError(f"no manifest.json under data.shards={job.data.shards!r}: build shards first "
                             f"(jobs/build_shards.py) or leave data.shards empty for the synthetic set")
    if job.storage_path and not storage.is_local(job.storage_path):
        storage.check_reachable(job.storage_path)
    if job.init.from_:
        check_init_source(job)
    ray = sys.modules.get("ray")
    if not (ray is not None and ray.is_initialized()) and not os.environ.get("RAY_ADDRESS"):
        check_feasible(job, {"CPU": float(local_ray_cpus())})


def tracking_uri_of(job: JobConfig) -> str:
    """The MLflow tracking URI of the job (resolved even with tracking off: `init.from = models:/...` uses it)."""
    from pipeline.tracking.mlflow_tracking import resolve_tracking_uri

    return resolve_tracking_uri(job.tracking.tracking_uri, work_path(job))


def check_init_source(job: JobConfig) -> None:
    """One-line error unless `init.from` names an existing checkpoint or registered model version."""
    uri = job.init.from_
    if uri.startswith("runs:/"):
        return
    if uri.startswith("models:/"):
        from mlflow.store.artifact.utils.models import get_model_name_and_version
        from mlflow.tracking import MlflowClient

        from pipeline.tracking.mlflow_tracking import normalize_model_uri

        tracking_uri = tracking_uri_of(job)
        try:
            get_model_name_and_version(MlflowClient(tracking_uri, registry_uri=tracking_uri),
                                       normalize_model_uri(uri))
        except Exception as e:  # noqa: BLE001 - any registry error becomes one readable line
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise StageError(f"init.from={uri!r} does not resolve in the MLflow registry at {tracking_uri}: "
                             f"{first}") from e
        return
    from pipeline.train.checkpoint import checkpoint_dir_of

    if not storage.exists(storage.join(checkpoint_dir_of(uri), "model.pt")):
        raise StageError(f"init.from={uri!r}: no model.pt there (expected a checkpoint directory or its model.pt)")


def init_ray(job: JobConfig) -> None:
    """Connect to the cluster of `ray job submit` (RAY_ADDRESS) or start a local instance with the AWS variables
    passed on to the workers."""
    import ray

    if ray.is_initialized():
        return
    env = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "MLFLOW_"))}
    runtime_env = {"env_vars": env} if env else None
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=runtime_env, log_to_driver=True)
    else:
        # the dashboard stays on (Ray's default): Ray Train's PlacementGroupCleaner polls the State API it serves
        # and logs a warning every second without it
        ray.init(address="local", num_cpus=local_ray_cpus(), runtime_env=runtime_env, log_to_driver=True)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False


def run_stage(job: JobConfig, register: bool = True, callbacks: list | None = None) -> StageResult:
    """Train one stage (resuming if a run of the same name exists in the storage path), evaluate, register.

    `callbacks`: Ray Train `UserCallback`s, e.g. Tune's `TuneReportCallback()` when a Tune trial drives the stage.
    """
    validate_inputs(job)  # before the heavy imports below: bad input fails within seconds

    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.data.loader import build_dataset, shard_files
    from pipeline.data.stream import scan_chunks
    from pipeline.eval.val_split import lossless_val_config
    from pipeline.tracking import mlflow_tracking as mt
    from pipeline.train.loop import DEBUG_ENV, train_loop_per_worker

    tracking_uri = tracking_uri_of(job)  # also with tracking off: the workers resolve init.from=models:/ there
    init_ray(job)
    check_feasible(job)
    job = ensure_shards(job)
    manifest = storage.read_json(storage.join(job.data.shards, "manifest.json"))
    categories = [{k: c[k] for k in ("id", "name", "frequency") if k in c} for c in manifest["categories"]]
    if job.model.num_classes != len(categories):
        print(f"[train] model.num_classes {job.model.num_classes} -> {len(categories)} (from the shards' manifest)")
    job = with_fed_loss_counts(with_manifest_classes(job, manifest), manifest)
    has_val = has_split(job, manifest, job.data.val_split)
    storage_path = job.storage_path or work_path(job, "ray_results")
    start_epoch = resume_epoch(storage_path, job.run_name)
    if start_epoch:
        print(f"[train] run {job.run_name} has a checkpoint in epoch {start_epoch}: resuming")
    # Training data: each worker streams its own slice of every epoch's plan (pipeline/data/stream.py); the driver
    # only lists the row groups (Parquet footers). Evaluation data goes through Ray Train's split as before.
    train_chunks = scan_chunks(shard_files(job.data, job.data.train_split))
    datasets = {}
    if has_val:
        datasets["val"] = build_dataset(job.data, job.data.val_split, train=False)

    run_id = ""
    if job.tracking.enabled:
        experiment = job.tracking.experiment or f"codetr-{job.stage}"
        run_id = mt.get_or_create_run(tracking_uri, experiment, job.run_name,
                                      tags={"dataset": job.dataset, "stage": job.stage})
        mt.log_params(tracking_uri, run_id, flatten(job))
        mt.log_text(tracking_uri, run_id, dump_yaml(job), "config.yaml")
        print(f"[mlflow] run {run_id} in experiment {experiment!r} at {tracking_uri}")

    loop_config: dict[str, Any] = {
        "job": to_dict(job), "categories": categories, "init_from": job.init.from_, "has_val": has_val,
        "tracking_uri": tracking_uri, "mlflow_run_id": run_id,
        "debug_env": {k: v for k, v in os.environ.items() if k in DEBUG_ENV},  # test knobs, see loop.py
        "run_dir": _run_dir_uri(storage_path, job.run_name),  # where resume looks for unregistered checkpoints
        "train_chunks": train_chunks.to_dict(),  # the training split's row groups: every worker plans from them
        # the shards' filesystem as resolved here (endpoint, retries), pickled to the workers and their read tasks
        "train_filesystem": storage.get_pyarrow_fs(train_chunks.files[0])[0],
    }
    fs, path = (None, storage_path)
    if "://" in storage_path and not storage.is_local(storage_path):
        fs, path = storage.get_pyarrow_fs(storage_path)
    if job.train.keep_checkpoints < RETRY.min_checkpoints_kept:
        print(f"[train] WARNING train.keep_checkpoints={job.train.keep_checkpoints}: a corrupt newest checkpoint "
              f"cannot fall back to a previous one (keep >= {RETRY.min_checkpoints_kept})")
    run_config = ray.train.RunConfig(
        name=job.run_name, storage_path=path, storage_filesystem=fs,
        failure_config=ray.train.FailureConfig(max_failures=job.scaling.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=job.train.keep_checkpoints),
        callbacks=callbacks,
    )
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=loop_config, scaling_config=ray_scaling_config(job),
        run_config=run_config, datasets=datasets,
        dataset_config=lossless_val_config(),  # val split with equal=False: no val image dropped
        torch_config=TorchConfig(backend=torch_backend(job.scaling.use_gpu)),  # gloo, or cpu:gloo,cuda:nccl
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    ckpt = result.checkpoint
    ckpt_uri = _checkpoint_uri(ckpt.path, storage_path) if ckpt else ""
    metrics = {k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
    print(f"[train] finished {job.run_name}: checkpoint {ckpt_uri}")
    out = StageResult(job.run_name, ckpt_uri, metrics, run_id, tracking_uri if job.tracking.enabled else "")
    if job.tracking.enabled and ckpt is not None and register:
        out = register_with_retries(job, out, categories)
    if job.tracking.enabled:
        _end_run_quietly(tracking_uri, run_id)
    return out


def ray_scaling_config(job: JobConfig) -> Any:
    """Ray Train's ScalingConfig: fixed `num_workers`, or elastic `(min_workers, num_workers)` when
    `scaling.min_workers` > 0 (Ray 2.60 Train V2 `ElasticScalingPolicy`: after a node loss the group restarts from
    the last checkpoint with as many workers as the cluster fits, at least min_workers)."""
    import ray.train

    s = job.scaling
    if s.min_workers > s.num_workers:
        raise StageError(f"scaling.min_workers={s.min_workers} exceeds scaling.num_workers={s.num_workers}")
    workers: int | tuple[int, int] = (s.min_workers, s.num_workers) if s.min_workers > 0 else s.num_workers
    return ray.train.ScalingConfig(num_workers=workers, use_gpu=s.use_gpu,
                                   resources_per_worker={"CPU": s.cpus_per_worker, **s.resources_per_worker})


def register_with_retries(job: JobConfig, res: StageResult, categories: list[dict]) -> StageResult:
    """`_register`, retried (`pipeline.retry`: register_attempts, register_backoff_s). A final failure raises
    RegistrationError naming the checkpoint and the command that registers it later."""
    try:
        return call_with_retries(lambda: _register(job, res, categories), RETRY.register_attempts,
                                 RETRY.register_backoff_s, f"register the model of {res.checkpoint_uri}")
    except Exception as e:  # noqa: BLE001 - every failure becomes the one actionable line below
        first = str(e).splitlines()[0][:300] if str(e) else ""
        raise RegistrationError(
            f"training finished but registering its model at {res.tracking_uri} failed after "
            f"{RETRY.register_attempts} attempts ({type(e).__name__}: {first}); "
            f"the checkpoint is {res.checkpoint_uri}; "
            f"register it later with: python jobs/register.py --checkpoint {res.checkpoint_uri}") from e


def _end_run_quietly(tracking_uri: str, run_id: str) -> None:
    """Mark the MLflow run finished; a tracking server that is away costs a warning, never the stage."""
    from pipeline.tracking import mlflow_tracking as mt

    try:
        mt.end_run(tracking_uri, run_id)
    except Exception as e:  # noqa: BLE001
        print(f"[mlflow] WARNING could not mark run {run_id} finished at {tracking_uri}: {type(e).__name__}")


def register_checkpoint(checkpoint_uri: str, tracking_uri: str = "", name: str = "") -> StageResult:
    """Register a finished stage's checkpoint later (`jobs/register.py`): the job config, categories, MLflow run id
    and best val AP come from the checkpoint itself (config.yaml, categories.json, trainer_state.json)."""
    import tempfile

    from pipeline.train.checkpoint import CATEGORIES, CONFIG, STATE, checkpoint_dir_of, load_optional

    directory = checkpoint_dir_of(checkpoint_uri)
    config_yaml = load_optional(directory, CONFIG)
    state = load_optional(directory, STATE)
    categories = load_optional(directory, CATEGORIES)
    if config_yaml is None or state is None or categories is None:
        raise StageError(f"{checkpoint_uri!r} is not a stage checkpoint: expected {CONFIG}, {STATE} and "
                         f"{CATEGORIES} there")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(config_yaml)
    try:
        job = load_config(f.name, [f"tracking.tracking_uri={tracking_uri}"] if tracking_uri else [])
    finally:
        os.unlink(f.name)
    if name:
        job = dataclasses.replace(job, tracking=dataclasses.replace(job.tracking, register_as=name))
    run_id = state.get("mlflow_run_id", "")
    if not run_id:
        raise StageError(f"checkpoint {checkpoint_uri!r} names no MLflow run (trained with tracking off)")
    res = StageResult(job.run_name, directory, {"val/AP": float(state.get("best_ap", -1.0))}, run_id,
                      tracking_uri_of(job))
    return register_with_retries(job, res, categories)


def with_manifest_classes(job: JobConfig, manifest: dict[str, Any]) -> JobConfig:
    """The job with model.num_classes = the number of categories in the shards' manifest."""
    n = len(manifest["categories"])
    if job.model.num_classes == n:
        return job
    return dataclasses.replace(job, model=dataclasses.replace(job.model, num_classes=n))


def with_fed_loss_counts(job: JobConfig, manifest: dict[str, Any]) -> JobConfig:
    """With model.loss.fed_loss on: model.loss.fed_loss_image_counts = the manifest's per-category `image_count`
    (training images containing each label, in label order), the FedLoss sampling weights ** 0.5."""
    if not job.model.loss.fed_loss:
        return job
    counts = tuple(int(c.get("image_count", -1)) for c in manifest["categories"])
    if any(c < 0 for c in counts):
        raise StageError(f"model.loss.fed_loss needs per-category image counts in {job.data.shards}/manifest.json "
                         "(categories[].image_count): rebuild the shards with jobs/build_shards.py")  # fmt: skip
    print(f"[train] FedLoss weights from the manifest's image counts ({len(counts)} classes, "
          f"{sum(c > 0 for c in counts)} seen in training)")
    return dataclasses.replace(job, model=dataclasses.replace(
        job.model, loss=dataclasses.replace(job.model.loss, fed_loss_image_counts=counts)))


def has_split(job: JobConfig, manifest: dict[str, Any], split: str) -> bool:
    """Whether the shards hold `split` (listed in the manifest or present as a directory)."""
    return split in manifest.get("splits", {}) or storage.exists(storage.join(job.data.shards, split))


def resume_epoch(storage_path: str, run_name: str) -> int:
    """The epoch a re-run of `run_name` resumes in: `epoch` of the latest checkpoint in Ray Train's snapshot
    (the loop reports the running epoch mid-epoch and the next one at an epoch end); 0 for a new run."""
    snapshot = storage.join(storage_path, run_name, "checkpoint_manager_snapshot.json")
    try:
        latest = storage.read_json(snapshot).get("latest_checkpoint_result") or {}
    except (FileNotFoundError, ValueError):
        return 0
    return int((latest.get("metrics") or {}).get("epoch", 0))


def _run_dir_uri(storage_path: str, run_name: str) -> str:
    """The URI of Ray Train's run directory (`RunConfig(storage_path, name)`), absolute as the driver sees it: a
    relative local path would resolve against each worker's own working directory."""
    protocol, path = storage.split_uri(storage.join(storage_path, run_name))
    return path if protocol == "file" else f"{protocol}://{path}"


def _checkpoint_uri(path: str, storage_path: str) -> str:
    if "://" in storage_path and not storage.is_local(storage_path):
        protocol = storage_path.split("://", 1)[0]
        return f"{protocol}://{path}" if "://" not in path else path
    return path


def _register(job: JobConfig, res: StageResult, categories: list[dict]) -> StageResult:
    from pipeline.models import build_model
    from pipeline.tracking import mlflow_tracking as mt
    from pipeline.train.checkpoint import load_model_state

    model = build_model(job.model)
    model.load_state_dict(load_model_state(res.checkpoint_uri, prefer_ema=job.train.ema))
    model.categories = categories
    model.eval()
    ap = res.metrics.get("val/AP", -1.0)
    name = job.tracking.register_as or f"codetr-{job.dataset}"
    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    version, champion = mt.log_and_register_model(res.tracking_uri, res.mlflow_run_id, model, name, ap,
                                                   code_paths=[package_dir])
    res.registered_name, res.registered_version, res.champion = name, version, champion
    res.model_uri = f"models:/{name}/{version}"
    print(f"[mlflow] registered {res.model_uri} (latest{', alias champion' if champion else ''}), val AP {ap:.4f}")
    return res


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)
