"""Shared fixtures: real local services, no mocks.

- `s3_endpoint`: moto's S3 server on 127.0.0.1 (HTTP, a separate thread), reachable from Ray workers too.
- `s3_bucket`: a fresh bucket per test, as an `s3://` URI.
- `ray_local`: one local Ray instance per test session (logical CPU overcommit on the 2-core machine).
- `mlflow_server`: a real `mlflow server` process on 127.0.0.1 (SQLite, temp artefact store), one per module.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

import pytest

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in [*AWS_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(AWS_ENV)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture()
def s3_bucket(s3_endpoint):
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    name = f"test-bucket-{uuid.uuid4().hex[:10]}"
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    fs.mkdir(name)
    yield f"s3://{name}"
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def ray_local(s3_endpoint):
    """A local Ray instance for the whole session. It starts after the moto endpoint so that every Ray worker
    sees AWS_ENDPOINT_URL and the fake credentials (passed through `runtime_env`)."""
    import ray
    from ray.data import DataContext

    env_vars = {k: os.environ[k] for k in [*AWS_ENV, "AWS_ENDPOINT_URL"] if k in os.environ}
    tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths must stay < 107 bytes
    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        object_store_memory=256 * 1024 * 1024,
        runtime_env={"env_vars": env_vars} if env_vars else None,
        _temp_dir=tmp,
        log_to_driver=False,
    )
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)  # Ray's session logs and any objects it spilled to disk


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1:<free port>, SQLite backend and artefact store in a temp dir."""
    d = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    log = open(d / "server.log", "w")  # noqa: SIM115 - closed in the finally below
    exe = os.path.join(os.path.dirname(sys.executable), "mlflow")
    proc = subprocess.Popen(
        [exe, "server", "--backend-store-uri", f"sqlite:///{d}/mlflow.db",
         "--artifacts-destination", str(d / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}: {(d / 'server.log').read_text()}")
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=5).status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server not healthy after 240 s: {(d / 'server.log').read_text()}")
            time.sleep(1)
        yield url
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)  # the server and its uvicorn workers: this process group only
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                continue
        log.close()


_DISK_FREE: list[int] = []  # bytes free in the temp dir: at the start, then after every test


def _sample_disk() -> None:
    _DISK_FREE.append(shutil.disk_usage(tempfile.gettempdir()).free)


def pytest_sessionstart(session) -> None:
    _sample_disk()


def pytest_runtest_teardown(item) -> None:
    _sample_disk()


def pytest_terminal_summary(terminalreporter) -> None:
    """Print the free disk where tmp_path and Ray write (at the start, lowest, at the end: a run that fills the disk
    fails in ways that look unrelated), and the overrides the recipe smoke tests used (tests/test_recipes.py): what
    a CPU run could not exercise."""
    _sample_disk()
    gib = [f"{b / 2**30:.1f}" for b in (_DISK_FREE[0], min(_DISK_FREE), _DISK_FREE[-1])]
    terminalreporter.write_line(f"disk free in {tempfile.gettempdir()}: {gib[0]} GiB at the start, lowest "
                                f"{gib[1]} GiB, {gib[2]} GiB at the end")
    module = sys.modules.get("test_recipes")
    used = getattr(module, "USED_OVERRIDES", None)
    if not used:
        return
    terminalreporter.section("recipe smoke overrides (what differs from the shipped recipe)")
    for recipe, overrides in used.items():
        terminalreporter.write_line(f"{recipe}: " + " ".join(overrides))


def pytest_sessionfinish(session, exitstatus) -> None:
    """Never exit 5: when tests were collected but the default `-m 'not slow'` (pyproject addopts) deselected them
    all (e.g. `pytest tests/test_fault_node.py`), say so and exit 0; `-m slow` runs them."""
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED and session.config.getoption("markexpr") == "not slow":
        sys.stdout.write("\nevery selected test is marked slow and left out of the default run: add -m slow\n")
        session.exitstatus = pytest.ExitCode.OK
