"""The embedded SQLite MLflow store keeps its artefacts beside the database, not in the directory the job was
started from (MLflow's default for a database store is `./mlruns` of the process that creates the experiment)."""

from __future__ import annotations

from pathlib import Path

from pipeline.tracking.mlflow_tracking import get_or_create_run, local_artifact_location, log_text


def test_sqlite_store_artifacts_live_beside_the_database(tmp_path, monkeypatch):
    store, elsewhere = tmp_path / "store", tmp_path / "started-here"
    store.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    uri = "sqlite:///" + str(store / "mlflow.db")

    run_id = get_or_create_run(uri, "codetr-finetune", "stage-1")
    log_text(uri, run_id, "hello", "notes/hello.txt")

    written = store / "artifacts" / "codetr-finetune" / run_id / "artifacts" / "notes" / "hello.txt"
    assert written.read_text() == "hello"
    assert list(elsewhere.iterdir()) == []  # no ./mlruns where the job was started
    assert get_or_create_run(uri, "codetr-finetune", "stage-1") == run_id  # resume finds the same run


def test_only_local_sqlite_stores_get_a_location(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert local_artifact_location("sqlite:///rel/mlflow.db", "e") == (tmp_path / "rel" / "artifacts" / "e").as_uri()
    assert local_artifact_location("sqlite:////abs/x/mlflow.db", "e") == Path("/abs/x/artifacts/e").as_uri()
    for uri in ("sqlite:////abs/x/mlflow.db?timeout=30", "sqlite+pysqlite:////abs/x/mlflow.db"):  # query, driver
        assert local_artifact_location(uri, "e") == Path("/abs/x/artifacts/e").as_uri()
    for uri in ("http://mlflow.internal:5000", "postgresql://u@h/db", "sqlite:///:memory:", "sqlite://", "databricks"):
        assert local_artifact_location(uri, "e") is None
