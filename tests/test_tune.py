"""Ray Tune search: config + space validation (fast), and one real search (slow) on a local Ray cluster
against a real `mlflow server` on loopback: parent / child run structure, artefacts, ASHA stop, no Train
workers left behind, resume by name."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import time

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.tune.space import (
    ParamSpec,
    SearchConfig,
    apply_params,
    check_space,
    decode_params,
    field_type,
    label,
    to_tune_space,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL = os.path.join(REPO, "configs/local/tune_co_heads.yaml")
CLUSTER = os.path.join(REPO, "configs/tune_co_heads.yaml")
FIXED = ("train.max_steps", "train.epochs")


def _search(tmp_path, text: str) -> str:
    p = tmp_path / "search.yaml"
    p.write_text(text)
    return str(p)


# ------------------------------------------------------------------------------------------------------------
# config and space (no Ray)


def test_shipped_search_configs_load_and_validate():
    from pipeline.tune.search import load_search

    local = load_search(LOCAL)
    assert local.search.num_samples == 4 and local.search.scheduler.type == "asha"
    assert set(local.search.space) == {"model.co.lambda1", "model.co.lambda2", "model.co.aux_heads"}
    assert local.job.model.transformer.embed_dims == 128  # the tiny model came in through `job.base`
    probes = check_space(local.job, local.search.space, FIXED)
    assert {p.model.co.aux_heads for p in probes} == {(), ("atss",), ("atss", "faster_rcnn")}
    cluster = load_search(CLUSTER)
    assert cluster.job.model.backbone.name.startswith("resnet50") and cluster.job.scaling.use_gpu
    check_space(cluster.job, cluster.search.space, FIXED)


def test_default_space_is_the_issue_s():
    space = SearchConfig().space
    assert space["model.co.lambda1"] == ParamSpec("loguniform", 0.25, 4.0)
    assert space["model.co.lambda2"] == ParamSpec("loguniform", 0.5, 4.0)
    assert [label(v) for v in space["model.co.aux_heads"].values] == ["[]", "[atss]", "[atss, faster_rcnn]"]


@pytest.mark.parametrize(
    "space, match",
    [
        (
            {"model.co.lamda1": ParamSpec("uniform", 0.1, 1.0)},
            r"unknown config field 'model\.co\.lamda1' \(valid keys under model\.co: .*lambda1, lambda2",
        ),
        ({"model.co": ParamSpec("choice", values=(1,))}, r"'model\.co' is a config section"),
        (
            {"model.co.lambda1": ParamSpec("uniform", -1.0, 2.0)},
            r"model\.co\.lambda1: value -1\.0 .*negative",
        ),
        (
            {"model.co.aux_heads": ParamSpec("choice", values=(["atss"], ["yolo"]))},
            r"value \[yolo\].*unknown aux head 'yolo'",
        ),
        (
            {"data.batch_size": ParamSpec("uniform", 1.0, 4.0)},
            r"uniform needs a float field, 'data\.batch_size' is int",
        ),
        ({"model.co.lambda2": ParamSpec("randint", 1, 3)}, r"randint needs an int field"),
        ({"tracking.experiment": ParamSpec("choice", values=("a",))}, r"set by the search itself"),
        ({"train.max_steps": ParamSpec("randint", 10, 20)}, r"set by the search itself"),
        ({"train.amp": ParamSpec("choice", values=("bf16", "fp8"))}, r"value fp8 .*not one of"),
    ],
)
def test_bad_space_is_one_line_error(space, match):
    job = load_config(None)
    with pytest.raises(ConfigError, match=match) as e:
        check_space(job, space, FIXED)
    assert "\n" not in str(e.value)


def test_negative_weight_in_the_base_job_is_rejected():
    with pytest.raises(ConfigError, match=r"model\.co\.lambda2: value -2\.0 is negative") as e:
        job = load_config(None, ["model.co.lambda2=-2"])  # CoConfig rejects it as the job loads
        check_space(job, {"model.co.lambda1": ParamSpec("uniform", 0.5, 1.0)}, FIXED)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("{type: loguniform, lower: 0, upper: 4}", "loguniform needs lower > 0"),
        ("{type: uniform, lower: 3, upper: 1}", r"finite lower <= upper"),
        ("{type: choice, values: []}", "non-empty 'values'"),
        ("{type: normal, lower: 0, upper: 1}", r"'normal' is not one of"),
        (
            "{type: uniform, lowr: 0, upper: 1}",
            r"unknown config key 'search\.space\.model\.co\.lambda1\.lowr'",
        ),
    ],
)
def test_bad_domain_in_yaml(tmp_path, spec, match):
    from pipeline.tune.search import load_search

    path = _search(tmp_path, f"search:\n  space:\n    model.co.lambda1: {spec}\n")
    with pytest.raises(ConfigError, match=match):
        load_search(path)


def test_job_by_path_and_overrides(tmp_path):
    from pipeline.tune.search import load_search

    path = _search(
        tmp_path,
        f"job: {os.path.join(REPO, 'configs/local/pretrain_o365.yaml')}\n"
        "search: {name: s1, algo: optuna}\n",
    )
    cfg = load_search(path, ["job.model.co.lambda1=0.5", "search.num_samples=3", "job.train.lr=1e-4"])
    assert (
        cfg.job.model.co.lambda1 == 0.5
        and cfg.job.train.lr == 1e-4
        and cfg.job.model.transformer.embed_dims == 128
    )
    assert cfg.search.num_samples == 3 and cfg.search.algo == "optuna"
    with pytest.raises(ConfigError, match=r"unknown config key 'search\.num_sample'"):
        load_search(path, ["search.num_sample=3"])
    with pytest.raises(ConfigError, match="optuna cannot take grid"):
        load_search(path, ["search.space={model.co.lambda1: {type: grid, values: [1, 2]}}"])


def test_tune_space_round_trip():
    space = {
        "model.co.aux_heads": ParamSpec("choice", values=([], ["atss"], ["atss", "faster_rcnn"])),
        "model.co.lambda1": ParamSpec("loguniform", 0.25, 4.0),
        "train.seed": ParamSpec("randint", 0, 3),
        "init.from": ParamSpec("grid", values=("", "a/b")),
    }
    tune_space = to_tune_space(space)
    assert tune_space["model.co.aux_heads"].categories == ["[]", "[atss]", "[atss, faster_rcnn]"]
    assert tune_space["train.seed"].upper == 4  # Tune's randint excludes upper; ours includes it
    assert tune_space["init.from"] == {"grid_search": ["", "a/b"]}
    params = decode_params(
        space, {"model.co.aux_heads": "[atss]", "model.co.lambda1": 0.3, "train.seed": 2, "init.from": "a/b"}
    )
    job = apply_params(load_config(None), params)
    assert job.model.co.aux_heads == ("atss",) and job.model.co.lambda1 == 0.3 and job.init.from_ == "a/b"
    assert field_type("init.from") is str


def test_optuna_search_takes_the_space():
    from pipeline.tune.search import _search_alg

    space = SearchConfig().space
    alg = _search_alg(SearchConfig(algo="optuna", seed=1))
    assert alg.set_search_properties("val/AP", "max", to_tune_space(space))
    suggested = [alg.suggest(f"t{i}") for i in range(6)]
    for config in suggested:
        params = decode_params(space, config)
        assert 0.25 <= params["model.co.lambda1"] <= 4.0 and 0.5 <= params["model.co.lambda2"] <= 4.0
        assert apply_params(load_config(None), params).model.co.aux_heads in {
            (),
            ("atss",),
            ("atss", "faster_rcnn"),
        }
    assert len({c["model.co.lambda1"] for c in suggested}) == 6


def test_cluster_request_checked():
    from pipeline.tune.search import check_cluster

    job = load_config(None, ["scaling.num_workers=2", "scaling.cpus_per_worker=1"])
    s = SearchConfig(max_concurrent=2, num_samples=4)
    check_cluster([job], s, {"CPU": 4.0})
    with pytest.raises(
        ConfigError, match=r"one trial asks for 2 workers x 1 CPU but the Ray cluster has 1 CPUs"
    ):
        check_cluster([job], s, {"CPU": 1.0})
    with pytest.raises(
        ConfigError, match=r"search\.max_concurrent=2 trials x \(2 workers x 1 CPU\) do not fit"
    ):
        check_cluster([job], s, {"CPU": 3.0})
    gpu = load_config(None, ["scaling.num_workers=8", "scaling.use_gpu=true"])
    with pytest.raises(
        ConfigError, match=r"8 workers x 1 CPU \+ 8 GPUs but the Ray cluster has 64 CPUs, 4 GPUs"
    ):
        check_cluster([gpu], s, {"CPU": 64.0, "GPU": 4.0})


def test_job_rejects_bad_space_before_ray(tmp_path):
    """The job's one-line error (exit 2) for an unknown aux head, before any Ray / trial starts."""
    t0 = time.time()
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "jobs/tune_co_heads.py"),
            "--set",
            f"job.work_dir={tmp_path}",
            "--set",
            "search.space={model.co.aux_heads: {type: choice, values: [[atss], [yolo]]}}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown aux head 'yolo'" in lines[0], proc.stderr
    assert not os.path.exists(tmp_path / "ray_results") and time.time() - t0 < 120


# ------------------------------------------------------------------------------------------------------------
# one real search (slow)


SEARCH_OVERRIDES = [
    # two trials one after the other: a normal one, then one whose detections are all dropped (score <= 1),
    # so its val AR100 is exactly 0 at the first rung and ASHA must stop it there
    "search.name=t-search",
    "search.num_samples=1",
    "search.max_concurrent=1",
    "search.metric=val/AR100",
    "search.scheduler={type: asha, time_attr: epoch, max_t: 2, grace_period: 1, reduction_factor: 2}",
    "search.space={model.test.score_threshold: {type: grid, values: [0.0, 1.0]}}",
    "job.model.co.aux_heads=[]",
    "job.synthetic.images=8",
    "job.synthetic.val_images=4",
]


@pytest.fixture(scope="module")
def search_run(tmp_path_factory, mlflow_server, ray_local):
    from pipeline.tune.search import load_search, run_search

    work = tmp_path_factory.mktemp("tune")
    cfg = load_search(
        LOCAL, [*SEARCH_OVERRIDES, f"job.work_dir={work}", f"job.tracking.tracking_uri={mlflow_server}"]
    )
    import ray

    before = {"pgs": _live_placement_groups(), "free_cpu": ray.available_resources().get("CPU", 0.0),
              "actors": collections.Counter(_alive_train_actors())}
    t0 = time.time()
    res = run_search(cfg)
    return cfg, res, time.time() - t0, before


def _live_placement_groups() -> set[str]:
    import ray

    return {k for k, pg in ray.util.placement_group_table().items() if pg["state"] != "REMOVED"}


@pytest.mark.slow  # the local search (2 trials, ASHA, ~150 s); the Tune recipes run in CI (test_recipes)
def test_search_runs_and_asha_stops_the_weaker_trial(search_run):
    cfg, res, _, _ = search_run
    assert len(res.rows) == 2
    good, bad = sorted(res.rows, key=lambda r: r["params"]["model.test.score_threshold"])
    assert good["status"] == "completed" and good["epochs"] == 2 and good["val/AR100"] > 0, res.table
    assert bad["status"] == "stopped early" and bad["stopped_early"] and bad["epochs"] == 1, res.table
    assert bad["val/AR100"] == 0.0
    assert res.best is good and res.best_checkpoint_uri == good["checkpoint"]
    assert os.path.exists(os.path.join(res.best_checkpoint_uri, "model.pt"))
    assert res.best_config.model.test.score_threshold == 0.0 and res.best_config.train.epochs == 2
    assert "| trial" in res.table and "stopped early" in res.table


@pytest.mark.slow  # the local search (2 trials, ASHA, ~150 s); the Tune recipes run in CI (test_recipes)
def test_mlflow_parent_and_child_runs(search_run, mlflow_server):
    from mlflow.tracking import MlflowClient

    cfg, res, _, _ = search_run
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("codetr-tune")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.info.run_id == res.parent_run_id]
    assert len(parent) == 1 and parent[0].info.run_name == "t-search" and parent[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == res.parent_run_id]
    assert sorted(c.info.run_name for c in children) == sorted(r["mlflow_run"] for r in res.rows)
    by_name = {c.info.run_name: c for c in children}
    for row in res.rows:
        child = by_name[row["mlflow_run"]]
        assert child.data.params["model.test.score_threshold"] == str(
            row["params"]["model.test.score_threshold"]
        )
        assert child.data.tags["tune.status"] == row["status"]
        expected = "KILLED" if row["stopped_early"] else "FINISHED"
        assert (
            child.info.status == expected
            and child.data.tags["tune.stopped_early"] == str(row["stopped_early"]).lower()
        )
        history = client.get_metric_history(child.info.run_id, "val/AR100")
        assert len(history) == row["epochs"]  # one evaluation per epoch, over time
    stopped = by_name[[r for r in res.rows if r["stopped_early"]][0]["mlflow_run"]]
    assert "ASHA" in stopped.data.tags["tune.stop_reason"]
    arts = {a.path for a in client.list_artifacts(res.parent_run_id)}
    assert {"results.csv", "ap_vs_lambda.png", "best_config.yaml", "search_config.yaml"} <= arts
    with open(client.download_artifacts(res.parent_run_id, "results.csv")) as f:
        csv_text = f.read()
    header = csv_text.splitlines()[0].split(",")
    assert header[:5] == ["trial", "lambda1", "lambda2", "K", "aux_heads"] and "stopped_early" in header
    assert len(csv_text.strip().splitlines()) == 3
    p = parent[0].data
    assert (
        p.tags["best_checkpoint_uri"] == res.best_checkpoint_uri and p.tags["best_trial"] == res.best["trial"]
    )
    assert p.metrics["trials_stopped_early"] == 1 and p.params["search.metric"] == "val/AR100"
    with open(client.download_artifacts(res.parent_run_id, "best_config.yaml")) as f:
        best_yaml = f.read()
    assert "score_threshold: 0.0" in best_yaml
    assert not client.search_registered_models()  # no model registered per trial


def _alive_train_actors() -> list[str]:
    """Class names of live Ray Train actors. `ray.util.state.list_actors` needs the dashboard, which the
    tests' local Ray runs without; then the GCS actor table (the same records) is read directly."""
    import ray

    names = ("RayTrainWorker", "TrainController")
    try:
        from ray.util.state import list_actors

        actors = list_actors(
            address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")], limit=10000
        )
        return [a.class_name for a in actors if a.class_name in names]
    except Exception:  # noqa: BLE001  (no dashboard: ServerUnavailable / ConnectionError)
        table = ray._private.state.actors().values()
        return [a["ActorClassName"] for a in table if a["State"] == "ALIVE" and a["ActorClassName"] in names]


@pytest.mark.slow  # the local search (2 trials, ASHA, ~150 s); the Tune recipes run in CI (test_recipes)
def test_stopped_trial_leaves_no_train_workers(search_run):
    import ray

    _, res, _, before = search_run
    assert any(r["stopped_early"] for r in res.rows)
    deadline = time.time() + 180
    while True:  # a grace period: actors die asynchronously after their owner (slow on a loaded machine)
        # only actors the search created count (earlier tests of the session may own a live controller)
        alive = sorted((collections.Counter(_alive_train_actors()) - before["actors"]).elements())
        pgs = _live_placement_groups() - before["pgs"]
        free = ray.available_resources().get("CPU", 0.0)
        if (not alive and not pgs and free >= before["free_cpu"]) or time.time() > deadline:
            break
        time.sleep(2)
    assert not alive, f"Train actors still alive after the search: {alive}"
    assert not pgs, f"placement groups (reserved Train worker resources) left behind: {pgs}"
    assert free >= before["free_cpu"], f"{free} CPUs free after the search, {before['free_cpu']} before"


@pytest.mark.slow  # the local search (2 trials, ASHA, ~150 s); the Tune recipes run in CI (test_recipes)
def test_rerun_with_same_name_resumes_instead_of_starting_over(search_run, mlflow_server):
    from mlflow.tracking import MlflowClient

    from pipeline.tune.search import run_search

    cfg, res, first_s, _ = search_run
    t0 = time.time()
    again = run_search(cfg)
    assert [(r["trial"], r["status"], r["epochs"]) for r in again.rows] == [
        (r["trial"], r["status"], r["epochs"]) for r in res.rows
    ]
    assert again.parent_run_id == res.parent_run_id
    client = MlflowClient(mlflow_server)
    children = client.search_runs(
        [client.get_experiment_by_name("codetr-tune").experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{res.parent_run_id}'",
    )
    assert len(children) == 2
    assert time.time() - t0 < first_s
