"""Load a model for inference from any URI (the top of the loading layers: it dispatches to the MLflow pyfunc,
the registry and the checkpoint readers, none of which imports it back).

    loaded = load_for_inference("models:/codetr-coco@champion")   # registered pyfunc version (or an older
    loaded = load_for_inference("runs:/<run id>/model")             #   mlflow.pytorch one), an MLflow run,
    loaded = load_for_inference(".codetr/ray_results/.../checkpoint_000003")   # or a checkpoint directory
    loaded.model, loaded.categories, loaded.preprocess
"""

from __future__ import annotations

from typing import Any

from pipeline.inference.model_io import LoadedModel
from pipeline.inference.preprocess import PreprocessConfig


def load_for_inference(uri: str, tracking_uri: str | None = None, job: Any | None = None) -> LoadedModel:
    """`models:/name@alias`, `models:/name/3`, `models:/name@latest`, `runs:/<id>/<path>` or a checkpoint
    directory (or its model.pt, any storage URI) -> LoadedModel on the CPU.

    `job` (a JobConfig) supplies the preprocessing and model config where the source has none (checkpoints
    without config.yaml, registered versions logged before the pyfunc existed)."""
    from pipeline.config import JobConfig

    job = job or JobConfig()
    if uri.startswith(("models:/", "runs:/")):
        from pipeline.serving.pyfunc import load_registered

        loaded = load_registered(uri, tracking_uri)
        if loaded is not None:
            return loaded
        from pipeline.tracking.mlflow_tracking import load_registered_model

        model = load_registered_model(uri, tracking_uri)
        return LoadedModel(model, list(getattr(model, "categories", None) or []),
                           PreprocessConfig.from_data(job.data), uri)
    from pipeline.config import from_dict
    from pipeline.eval.run import load_model_for_eval
    from pipeline.train import checkpoint as ckpt_io

    text = ckpt_io.load_optional(ckpt_io.checkpoint_dir_of(uri), ckpt_io.CONFIG)
    data = job.data
    if text:
        import yaml

        data = from_dict(JobConfig, yaml.safe_load(text)).data
    model, categories = load_model_for_eval(uri, job)
    return LoadedModel(model, list(categories or []), PreprocessConfig.from_data(data), uri)
