"""A training stage against real services: shards and Ray Train checkpoints on s3:// served by moto's server over
HTTP, tracking and the model registry on a real `mlflow server` process on loopback (SQLite backend, artefacts in
a temp dir). One stage run is shared by the tests of this module.
"""

from __future__ import annotations

import os
import uuid

import pytest
import torch
import yaml
from tiny_stage import TINY_STAGE as TINY

from pipeline import storage
from pipeline.config import flatten, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SECRET_MARKERS = ("secret", "password", "token", "access_key", "credential")


@pytest.fixture(scope="module")
def s3_stage(ray_local, s3_endpoint, mlflow_server, tmp_path_factory):
    """Synthetic shards built onto s3://, then a 2-step stage with storage_path on s3:// tracked on the server."""
    import s3fs

    from pipeline.data.shards import build_shards
    from pipeline.data.synthetic import SyntheticConfig, generate_dataset
    from pipeline.train.driver import run_stage

    work = tmp_path_factory.mktemp("s3-stage")
    bucket = f"codetr-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem(endpoint_url=s3_endpoint).mkdir(bucket)
    shards = f"s3://{bucket}/shards/o365"
    gen = generate_dataset(str(work / "src"), SyntheticConfig(style="o365", classes=3, images=8, val_images=2,
                                                              image_size=(64, 96), seed=3))
    for split, paths in gen.splits.items():
        build_shards(paths.annotations, paths.images, shards, split=split)
    job = load_config(os.path.join(REPO, "configs/local/pretrain_o365.yaml"), [
        *TINY, f"work_dir={work}", "name=s3-stage", f"data.shards={shards}",
        f"storage_path=s3://{bucket}/ray_results", f"tracking.tracking_uri={mlflow_server}",
        "train.max_steps=2", "train.checkpoint_every_steps=1", "train.keep_checkpoints=1"])
    result = run_stage(job)
    return {"result": result, "job": job, "bucket": bucket, "work": work, "tracking_uri": mlflow_server}


@pytest.mark.slow  # one s3 stage shared by 3 tests (~100 s); the fault_object_store tests cover s3 in CI
def test_shards_and_checkpoints_on_s3(s3_stage):
    from pipeline.train.checkpoint import load_model_state, load_optional

    res, bucket = s3_stage["result"], s3_stage["bucket"]
    run_dir = f"s3://{bucket}/ray_results/s3-stage"
    assert res.checkpoint_uri.startswith(f"{run_dir}/checkpoint_"), res.checkpoint_uri
    state = load_optional(res.checkpoint_uri, "trainer_state.json")
    assert state["step"] == 2 and state["mlflow_run_id"] == res.mlflow_run_id
    assert load_model_state(res.checkpoint_uri)  # model.pt readable over HTTP from the moto endpoint
    assert storage.exists(f"{run_dir}/checkpoint_manager_snapshot.json")
    kept = [u for u in storage.listdir(run_dir) if u.rsplit("/", 1)[-1].startswith("checkpoint_2")]
    assert kept == [res.checkpoint_uri]  # keep_checkpoints=1: the step-1 checkpoint was deleted on s3
    assert not os.path.exists(s3_stage["work"] / "ray_results")  # nothing fell back to the local disk
    assert res.metrics["step"] == 2 and "val/AP" in res.metrics


@pytest.mark.slow  # one s3 stage shared by 3 tests (~100 s); the fault_object_store tests cover s3 in CI
def test_mlflow_run_params_metrics_and_artifacts(s3_stage):
    from mlflow.tracking import MlflowClient

    res, job = s3_stage["result"], s3_stage["job"]
    client = MlflowClient(s3_stage["tracking_uri"])
    run = client.get_run(res.mlflow_run_id)
    assert run.info.run_name == "s3-stage" and run.info.status == "FINISHED"
    assert run.data.tags["dataset"] == "o365" and run.data.tags["stage"] == "pretrain"

    params = run.data.params
    flat = flatten(job)
    assert params["train.lr"] == str(job.train.lr) and params["data.shards"] == job.data.shards
    assert params["storage_path"] == job.storage_path and params["model.num_classes"] == "3"  # from the manifest
    assert len(params) >= len(flat) - 5
    assert not [k for k in params if any(m in k.lower() for m in SECRET_MARKERS)]
    secrets = {os.environ.get("AWS_SECRET_ACCESS_KEY"), os.environ.get("AWS_ACCESS_KEY_ID")} - {None}
    assert not [k for k, v in params.items() if v in secrets]

    loss = client.get_metric_history(res.mlflow_run_id, "train/loss")
    # a worker-group restart (e.g. Ray's memory monitor on a loaded machine) replays steps: same steps, more values
    assert sorted({m.step for m in loss}) == [1, 2] and all(m.value > 0 for m in loss)
    ips = client.get_metric_history(res.mlflow_run_id, "train/images_per_s")
    wait = client.get_metric_history(res.mlflow_run_id, "train/data_wait_fraction")
    assert ips and all(m.value > 0 for m in ips) and all(0.0 <= m.value <= 1.0 for m in wait)
    assert client.get_metric_history(res.mlflow_run_id, "val/AP")
    print(f"\n[measured] images/s per step: {[round(m.value, 2) for m in ips]}; "
          f"data-wait fraction: {[round(m.value, 3) for m in wait]}")

    names = {a.path for a in client.list_artifacts(res.mlflow_run_id)}
    assert {"config.yaml", "metrics"} <= names, names  # MLflow 3 keeps the logged model outside run artefacts
    local = client.download_artifacts(res.mlflow_run_id, "config.yaml", str(s3_stage["work"]))
    with open(local) as f:
        logged = yaml.safe_load(f)
    assert logged["train"]["max_steps"] == 2 and logged["data"]["shards"] == job.data.shards
    history = client.download_artifacts(res.mlflow_run_id, "metrics/worker_history.jsonl", str(s3_stage["work"]))
    assert os.path.getsize(history) > 0


@pytest.mark.slow  # one s3 stage shared by 3 tests (~100 s); the fault_object_store tests cover s3 in CI
def test_registry_champion_alias_and_loaded_model_predicts_the_same(s3_stage):
    from mlflow.store.artifact.utils.models import get_model_name_and_version
    from mlflow.tracking import MlflowClient

    from pipeline.models import build_model
    from pipeline.tracking import mlflow_tracking as mt
    from pipeline.train.checkpoint import load_model_state

    res, uri = s3_stage["result"], s3_stage["tracking_uri"]
    client = MlflowClient(uri)
    name = "codetr-o365"
    assert res.registered_name == name and res.champion and res.model_uri == f"models:/{name}/{res.registered_version}"
    first = res.registered_version
    ap0 = res.metrics["val/AP"]
    assert client.get_model_version_by_alias(name, "champion").version == str(first)

    model = build_model(load_config(os.path.join(REPO, "configs/local/pretrain_o365.yaml"),
                                    [*TINY, "model.num_classes=3"]).model)
    model.load_state_dict(load_model_state(res.checkpoint_uri))
    model.categories = [{"id": 1, "name": "a"}]
    model.eval()
    worse, champ_worse = mt.log_and_register_model(uri, res.mlflow_run_id, model, name, ap0 - 0.25)
    assert worse == first + 1 and not champ_worse
    assert client.get_model_version_by_alias(name, "champion").version == str(first)  # did not move
    better, champ_better = mt.log_and_register_model(uri, res.mlflow_run_id, model, name, ap0 + 0.25)
    assert better == first + 2 and champ_better
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version == str(better) and float(champion.tags["val_AP"]) == pytest.approx(ap0 + 0.25)
    assert champion.run_id == res.mlflow_run_id
    # `latest` is MLflow's built-in; `@latest` is accepted as a synonym
    assert get_model_name_and_version(client, mt.normalize_model_uri(f"models:/{name}@latest")) == (name, str(better))
    assert not [v for v in client.search_model_versions(f"name='{name}'") if v.current_stage not in ("None", None)]

    loaded = mt.load_registered_model(f"models:/{name}@champion", uri)
    assert loaded.categories == model.categories
    torch.manual_seed(0)
    images, masks = torch.randn(2, 3, 80, 96), torch.zeros(2, 80, 96, dtype=torch.bool)
    masks[1, :, 64:] = True  # second image narrower: padded on the right
    with torch.no_grad():
        want, got = model(images, masks), loaded(images, masks)
    for w, g in zip(want, got):
        assert w.keys() == g.keys()
        for k in w:
            assert torch.allclose(w[k].float(), g[k].float(), atol=1e-6), k
