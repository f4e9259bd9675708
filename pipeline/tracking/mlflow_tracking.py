"""MLflow: runs, params, metrics, artefacts and the model registry (aliases, never the deprecated stages).

`latest`: MLflow 3 reserves the alias name "latest" (setting it raises) because `models:/<name>/latest` is built
in and always resolves to the newest version. So registration sets only `champion`, and every loader here accepts
`models:/<name>@latest` as a synonym of the built-in `models:/<name>/latest`.

Only the driver and rank 0 call these. The embedded default store is an absolute-path SQLite file (a relative
`sqlite:///mlflow.db` would resolve inside Ray's session directory on the workers).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from pipeline.tracking.model_uri import normalize_model_uri  # noqa: F401  (re-exported)

SECRET_MARKERS = ("secret", "password", "token", "access_key", "credential")


def resolve_tracking_uri(configured: str, work_dir: str) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else sqlite:////<abs work_dir>/mlflow.db."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        os.makedirs(work_dir, exist_ok=True)
        uri = "sqlite:///" + os.path.abspath(os.path.join(work_dir, "mlflow.db"))
    return uri


def safe_params(flat: dict[str, Any]) -> dict[str, str]:
    """Flattened config -> MLflow params, with anything credential-like left out and values capped at 6000 chars."""
    return {k: str(v)[:6000] for k, v in flat.items() if not any(m in k.lower() for m in SECRET_MARKERS)}


def local_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Where a new experiment of a local SQLite store keeps its artefacts: `<db dir>/artifacts/<experiment>` (a
    file URI). MLflow's own default for a database store is `./mlruns` of whichever process creates the experiment,
    i.e. the directory the job was started from, not the store's (the tests' runs piled up in the checkout). None for
    any other store: a tracking server or a database server has its own artefact root."""
    if not tracking_uri.startswith("sqlite"):  # also sqlite+pysqlite://
        return None
    from sqlalchemy.engine import make_url  # MLflow's own database layer: parses driver, path and query

    db = make_url(tracking_uri).database
    if not db or db == ":memory:":
        return None
    return Path(os.path.abspath(db)).parent.joinpath("artifacts", experiment).as_uri()


def get_or_create_run(tracking_uri: str, experiment: str, run_name: str, tags: dict[str, str] | None = None) -> str:
    """Id of the run named `run_name` in `experiment` (reopened on resume), created if absent; a new experiment of a
    local SQLite store keeps its artefacts beside the database (`local_artifact_location`)."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(
        experiment, artifact_location=local_artifact_location(tracking_uri, experiment))
    found = client.search_runs([exp_id], filter_string=f"tags.`mlflow.runName` = '{run_name}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        if found[0].info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(exp_id, run_name=run_name, tags=tags or {})
    return run.info.run_id


def log_params(tracking_uri: str, run_id: str, params: dict[str, Any]) -> None:
    client = MlflowClient(tracking_uri)
    existing = client.get_run(run_id).data.params
    todo = {k: v for k, v in safe_params(params).items() if k not in existing}
    items = list(todo.items())
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=[mlflow.entities.Param(k, v) for k, v in items[i : i + 100]])


def log_metrics(tracking_uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    import time

    ts = int(time.time() * 1000)
    ms = [mlflow.entities.Metric(k, float(v), ts, step) for k, v in metrics.items() if _finite_number(v)]
    if ms:
        MlflowClient(tracking_uri).log_batch(run_id, metrics=ms)


def _finite_number(v: Any) -> bool:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return False
    return f == f and abs(f) != float("inf")


def log_text(tracking_uri: str, run_id: str, text: str, artifact_file: str) -> None:
    MlflowClient(tracking_uri).log_text(run_id, text, artifact_file)


def log_file(tracking_uri: str, run_id: str, path: str, artifact_path: str | None = None) -> None:
    MlflowClient(tracking_uri).log_artifact(run_id, path, artifact_path)


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    MlflowClient(tracking_uri).set_terminated(run_id, status=status)


def log_and_register_model(
    tracking_uri: str,
    run_id: str,
    model: Any,
    registered_name: str,
    metric_value: float,
    metric_name: str = "val_AP",
    code_paths: list[str] | None = None,
) -> tuple[int, bool]:
    """Log the deployed form of `model` (K = 0) as the project's MLflow pyfunc (`pipeline/serving/pyfunc.py`:
    signature, input example, categories from `model.categories`, preprocessing from the run's config.yaml) to
    the run, register it as a new version of `registered_name` (so `models:/<name>/latest` resolves to it) and
    move alias `champion` only if `metric_value` beats the current champion's. Returns (version, became_champion)."""
    from pipeline.serving.pyfunc import log_pyfunc

    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    preprocess = _run_preprocess(tracking_uri, run_id)
    with mlflow.start_run(run_id=run_id):
        info = log_pyfunc(model, getattr(model, "categories", None), preprocess, name="model",
                          code_paths=code_paths, pip_requirements=_pip_requirements())
    mv = mlflow.register_model(info.model_uri, registered_name)
    version = int(mv.version)
    client.set_model_version_tag(registered_name, str(version), metric_name, f"{metric_value:.6f}")
    client.set_model_version_tag(registered_name, str(version), "run_id", run_id)
    champion = True
    try:
        current = client.get_model_version_by_alias(registered_name, "champion")
        best = float(current.tags.get(metric_name, "-inf"))
        champion = metric_value > best
    except mlflow.exceptions.MlflowException:
        champion = True
    if champion:
        client.set_registered_model_alias(registered_name, "champion", str(version))
    return version, champion


def _run_preprocess(tracking_uri: str, run_id: str) -> Any:
    """The eval preprocessing of the run's logged config.yaml (defaults if the run has none)."""
    from pipeline.inference.preprocess import PreprocessConfig

    try:
        text = mlflow.artifacts.load_text(f"runs:/{run_id}/config.yaml")
    except Exception:  # noqa: BLE001 - no config logged (e.g. a test's bare run): the defaults
        return PreprocessConfig()
    import yaml

    from pipeline.config import JobConfig, from_dict

    return PreprocessConfig.from_data(from_dict(JobConfig, yaml.safe_load(text)).data)


def _pip_requirements() -> list[str]:
    import torch
    import torchvision

    return [f"torch=={torch.__version__.split('+')[0]}", f"torchvision=={torchvision.__version__.split('+')[0]}",
            "timm", "scipy"]


def load_registered_model(uri: str, tracking_uri: str | None = None) -> Any:
    """`models:/name@alias`, `models:/name@latest`, `models:/name/3` or `runs:/<id>/model` -> the logged
    nn.Module (eval mode): the deployed model of a pyfunc version, the whole module of an older
    mlflow.pytorch one."""
    from pipeline.serving.pyfunc import load_registered

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    loaded = load_registered(uri, tracking_uri)
    if loaded is not None:
        return loaded.model.eval()
    model = mlflow.pytorch.load_model(normalize_model_uri(uri), map_location="cpu")
    return model.eval()


def download_artifact_dir(tracking_uri: str, run_id: str, path: str) -> str:
    out = tempfile.mkdtemp(prefix="mlflow-art-")
    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=out,
                                               tracking_uri=tracking_uri)
