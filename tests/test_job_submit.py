"""Jobs on a real Ray cluster started with `ray start --head` (own temp dir, own ports, loopback dashboard):

- `ray job submit --working-dir .` of jobs/pretrain_o365.py succeeds;
- a job driver SIGKILLed while training and relaunched with the same run name resumes from its checkpoint.

The cluster is this module's alone: it is stopped by signalling its own `ray start --block` process (which shuts
down the processes it started), never with `ray stop`, which would stop every Ray instance on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import pytest
from tiny_stage import TINY_STAGE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)

TINY = [*TINY_STAGE, "tracking.enabled=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@dataclass
class Head:
    gcs_address: str
    dashboard_url: str
    env: dict[str, str]


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_", "CODETR_"))}
    # `ray start` turns token auth on when ~/.ray/auth_token exists, but clients (the job CLI, a driver's
    # ray.init(address=...)) only send the token with RAY_AUTH_MODE=token: say it to all of them, as Ray decides.
    has_token = os.path.exists(os.path.expanduser("~/.ray/auth_token"))
    env.update(PATH=f"{BIN}:{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1",
               RAY_AUTH_MODE="token" if has_token else "disabled",
               # the raylet gives its agents 16 s to start by default, too little on a loaded 2-core machine
               RAY_agent_register_timeout_ms="180000")
    return env


@pytest.fixture(scope="module")
def ray_head():
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: socket paths must stay < 107 bytes
    dash = _free_port()
    ports = {"port": _free_port(), "dashboard-port": dash, "ray-client-server-port": _free_port(),
             "dashboard-agent-listen-port": _free_port(), "dashboard-agent-grpc-port": _free_port(),
             "metrics-export-port": _free_port(), "runtime-env-agent-port": _free_port(),
             "node-manager-port": _free_port(), "object-manager-port": _free_port()}
    env = _clean_env()
    log = open(os.path.join(temp_dir, "ray-start.log"), "w")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen(
        [os.path.join(BIN, "ray"), "start", "--head", "--block", "--num-cpus=4", "--dashboard-host=127.0.0.1",
         f"--temp-dir={temp_dir}", "--disable-usage-stats", *[f"--{k}={v}" for k, v in ports.items()]],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{dash}"
        address_file = os.path.join(temp_dir, "ray_current_cluster")
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {proc.returncode}: {_tail(log.name)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"ray head not up after 300 s: {_tail(log.name)}")
            if os.path.exists(address_file) and _http_up(f"{url}/api/version"):
                break
            time.sleep(1)
        with open(address_file) as f:
            gcs = f.read().strip()
        yield Head(gcs_address=gcs, dashboard_url=url, env=env)
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` shuts down what it started
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=90)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything of ours left in its process group
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _http_up(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=5)
        return True
    except urllib.error.HTTPError:  # answered (e.g. 401 with token auth): the server is up
        return True
    except OSError:
        return False


def _tail(path: str, n: int = 3000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-n:]


def _final_state(work_dir: str, run_name: str) -> dict:
    snapshot = os.path.join(work_dir, "ray_results", run_name, "checkpoint_manager_snapshot.json")
    with open(snapshot) as f:
        latest = json.load(f)["latest_checkpoint_result"]["checkpoint_dir_name"]
    with open(os.path.join(work_dir, "ray_results", run_name, latest, "trainer_state.json")) as f:
        return json.load(f)


@pytest.mark.slow  # its own `ray start` head + job submission: ~110-190 s each; run with -m slow
def test_ray_job_submit_succeeds(ray_head, tmp_path):
    work_dir = str(tmp_path / "wd")
    proc = subprocess.run(
        [os.path.join(BIN, "ray"), "job", "submit", "--address", ray_head.dashboard_url, "--working-dir", REPO,
         "--", sys.executable, "jobs/pretrain_o365.py",
         *_sets(*TINY, f"work_dir={work_dir}", "name=submitted", "train.max_steps=2")],
        cwd=REPO, env=ray_head.env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert re.search(r"Job '[^']+' succeeded", out), out[-4000:]
    ckpt = re.search(r"^checkpoint:\s+(\S+)$", out, re.M)
    assert ckpt and ckpt.group(1).startswith(os.path.join(work_dir, "ray_results", "submitted")), out[-4000:]
    with open(os.path.join(ckpt.group(1), "trainer_state.json")) as f:
        assert json.load(f)["step"] == 2


@pytest.mark.slow  # its own `ray start` head + job submission: ~110-190 s each; run with -m slow
def test_driver_killed_and_relaunched_resumes(ray_head, tmp_path):
    work_dir, trace = str(tmp_path / "wd"), str(tmp_path / "trace.jsonl")
    env = {**ray_head.env, "RAY_ADDRESS": ray_head.gcs_address, "CODETR_TRACE_IDS": trace}
    cmd = [sys.executable, "jobs/pretrain_o365.py",
           *_sets(*TINY, f"work_dir={work_dir}", "name=driver-kill", "train.max_steps=6",
                  "train.checkpoint_every_steps=1")]  # 4 steps per epoch: the kill comes in epoch 0
    run_dir = os.path.join(work_dir, "ray_results", "driver-kill")

    first_log = open(tmp_path / "first.log", "w")  # noqa: SIM115 - closed once the driver is killed
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=first_log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 400
    while not _registered_checkpoint(run_dir):  # in Ray Train's snapshot, i.e. what a relaunch resumes from
        assert first.poll() is None, f"driver ended before it could be killed: {_tail(first_log.name)}"
        assert time.monotonic() < deadline, f"no checkpoint after 400 s: {_tail(first_log.name)}"
        time.sleep(0.5)
    first.send_signal(signal.SIGKILL)
    first.wait()
    first_log.close()
    killed_at = _steps(trace)
    assert 1 <= killed_at < 6, "the run finished before the driver was killed"
    # Ray ends the job's actors when its driver dies; wait for the training worker to be gone.
    old_worker = _trace(trace)[-1]["pid"]
    deadline = time.monotonic() + 120
    while _alive(old_worker) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive(old_worker), "the killed driver's training worker is still running"
    killed_lines = len(_trace(trace))

    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    resumed = re.search(r"resumed from checkpoint at epoch (\d+) step (\d+)", out)
    assert resumed and int(resumed.group(2)) > 0, out[-4000:]
    steps_after = [line["step"] for line in _trace(trace)[killed_lines:]]
    assert steps_after[0] == int(resumed.group(2)) + 1 and steps_after[-1] == 6, steps_after
    assert _final_state(work_dir, "driver-kill")["step"] == 6


def _registered_checkpoint(run_dir: str) -> str:
    try:
        with open(os.path.join(run_dir, "checkpoint_manager_snapshot.json")) as f:
            latest = json.load(f).get("latest_checkpoint_result") or {}
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return ""
    return latest.get("checkpoint_dir_name", "")


def _trace(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip().endswith("}")]


def _steps(path: str) -> int:
    lines = _trace(path)
    return lines[-1]["step"] if lines else 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
