"""Shared by the tests/test_fault_*.py files: the tiny stage, the per-step image trace (CODETR_TRACE_IDS), the
exactly-once check after a resume and the cost line each fault test prints for the issue's closing table."""

from __future__ import annotations

import glob
import json
import os

import pyarrow.parquet as pq
from tiny_stage import TINY_STAGE

from pipeline.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_job(work_dir: str, *overrides: str):
    return load_config(os.path.join(REPO, "configs/local/pretrain_o365.yaml"),
                       [*TINY_STAGE, f"work_dir={work_dir}", *overrides])


def train_image_ids(shard_glob: str) -> list[int]:
    files = glob.glob(shard_glob)
    return sorted(i for f in files for i in pq.read_table(f, columns=["image_id"]).column(0).to_pylist())


def read_trace(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def attempts(lines: list[dict]) -> list[list[dict]]:
    """Trace lines grouped by worker process (one group per attempt, in order)."""
    pids = list(dict.fromkeys(line["pid"] for line in lines))
    return [[line for line in lines if line["pid"] == p] for p in pids]


def check_exactly_once(lines: list[dict], all_ids: list[int], resume_step: int) -> dict:
    """The trained timeline (the latest attempt of each step) saw every image of each completed epoch exactly once,
    and after `resume_step` no image of an epoch trained twice. Returns the cost: steps replayed (trained by an
    earlier attempt after `resume_step` and again later), images trained twice or skipped after the resume."""
    final = {line["step"]: line for line in lines}
    assert sorted(final) == list(range(1, max(final) + 1)), f"steps missing: {sorted(final)}"
    epochs = sorted({final[s]["epoch"] for s in final})
    twice = skipped = 0
    for e in epochs:
        ids = [i for s in sorted(final) if final[s]["epoch"] == e for i in final[s]["ids"]]
        twice += len(ids) - len(set(ids))
        if e != epochs[-1] or len(ids) == len(all_ids):  # a complete epoch: every image once
            skipped += len(set(all_ids) - set(ids))
    replayed = len(lines) - len(final)
    assert twice == 0 and skipped == 0, f"images trained twice {twice}, skipped {skipped}"
    return {"steps_replayed": replayed, "twice": twice, "skipped": skipped, "resume_step": resume_step}


def cost_line(fault: str, injection: str, outcome: str, **cost) -> str:
    line = f"[fault-cost] {fault} | {injection} | {outcome} | " + ", ".join(f"{k}={v}" for k, v in cost.items())
    print("\n" + line)
    return line


class MlflowServer:
    """A real `mlflow server` (SQLite backend, local artefacts) that a test can stop and restart on the same port,
    as tests/conftest.py's `mlflow_server` fixture starts it."""

    def __init__(self, directory: str) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.dir, self.proc, self.url = directory, None, f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 240) -> float:
        """Start and wait until /health answers. Returns the seconds it took."""
        import subprocess
        import sys
        import time
        import urllib.request

        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
        exe = os.path.join(os.path.dirname(sys.executable), "mlflow")
        log = open(os.path.join(self.dir, "server.log"), "a")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [exe, "server", "--backend-store-uri", f"sqlite:///{self.dir}/mlflow.db", "--artifacts-destination",
             os.path.join(self.dir, "artifacts"), "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}")
            try:
                if urllib.request.urlopen(f"{self.url}/health", timeout=5).status == 200:
                    return time.monotonic() - t0
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"mlflow server not healthy after {timeout_s} s")

    def pause(self) -> None:
        """SIGSTOP the server's process group: it stops answering (connections hang until the client's timeout)."""
        import signal

        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        import signal

        os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        """Kill the server's process group (the server and its uvicorn worker)."""
        import contextlib
        import signal
        import subprocess

        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        self.proc = None
