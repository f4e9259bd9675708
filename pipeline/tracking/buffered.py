"""Rank 0's step metrics to MLflow without ever blocking or killing training.

    metrics = BufferedMetrics(tracking_uri, run_id)
    metrics.log({"train/loss": 1.3}, step)     # returns at once
    ...
    metrics.close()                            # flushes what it can within RETRY.tracking_close_timeout_s

Metric values go into a bounded buffer (`RETRY.tracking_buffer_max` values; the oldest are dropped beyond, and
counted) that a daemon thread drains with `MlflowClient.log_batch`. When the tracking server is unreachable the
thread prints one warning line, keeps the values, tries again every `RETRY.tracking_retry_every_s`, and when the
server answers again prints one line saying how many values it flushed and how long the outage lasted. Values
keep their step and their original timestamp, so the run's history is the same as without the outage.

The thread's MLflow calls use `RETRY.tracking_request_retries` / `RETRY.tracking_request_timeout_s`: MLflow reads
MLFLOW_HTTP_REQUEST_MAX_RETRIES / _TIMEOUT from the environment at each call, so `BufferedMetrics` sets them in
this process (a Ray Train worker: its other MLflow use, `init.from`, runs before). Set them before if a process
needs other values.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from mlflow.entities import Metric

from pipeline.retry import RETRY

MAX_BATCH = 1000  # MLflow's log_batch limit on metrics per call


class BufferedMetrics:
    def __init__(self, tracking_uri: str, run_id: str, max_buffered: int = RETRY.tracking_buffer_max,
                 retry_every_s: float = RETRY.tracking_retry_every_s, log: Callable[[str], None] = print) -> None:
        from mlflow.tracking import MlflowClient

        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(RETRY.tracking_request_retries))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(RETRY.tracking_request_timeout_s))
        self.uri, self.run_id, self._log = tracking_uri, run_id, log
        self._client = MlflowClient(tracking_uri)
        self._pending: collections.deque[Any] = collections.deque()
        self._max, self._retry_every = max_buffered, retry_every_s
        self._cv = threading.Condition()
        self._stop = False
        self._next_try = 0.0  # monotonic time of the next try while the server is away
        self._down_since: float | None = None
        self.outages = 0  # outages seen (one warning line each)
        self.dropped = 0  # values dropped because the buffer was full
        self.sent = 0  # values delivered
        self._last_step: int | None = None
        self._thread = threading.Thread(target=self._run, name="mlflow-metrics", daemon=True)
        self._thread.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Queue finite numeric `metrics` at `step` (non-blocking)."""
        ts = int(time.time() * 1000)
        with self._cv:
            for k, v in metrics.items():
                try:
                    f = float(v)
                except (TypeError, ValueError):
                    continue
                if f != f or abs(f) == float("inf"):
                    continue
                self._pending.append(Metric(k, f, ts, step))
                self._last_step = step
                if len(self._pending) > self._max:
                    self._pending.popleft()
                    self.dropped += 1
            self._cv.notify()

    @property
    def buffered(self) -> int:
        with self._cv:
            return len(self._pending)

    def _run(self) -> None:
        while True:
            with self._cv:
                # wait for values; while the server is away, also for the next try (log() does not hurry it)
                while not self._stop and (not self._pending or time.monotonic() < self._next_try):
                    self._cv.wait(max(0.05, self._next_try - time.monotonic()) if self._pending else None)
                if not self._pending:
                    return
                batch = [self._pending[i] for i in range(min(MAX_BATCH, len(self._pending)))]
            try:
                self._client.log_batch(self.run_id, metrics=batch)
            except Exception as e:  # noqa: BLE001 - any failure: keep the values, try again later
                with self._cv:
                    if self._down_since is None:
                        self._down_since = time.monotonic()
                        self.outages += 1
                        first = str(e).splitlines()[0][:160] if str(e) else ""
                        self._log(f"[mlflow] WARNING tracking server {self.uri} unreachable ({type(e).__name__}: "
                                  f"{first}); training continues, buffering metrics (up to {self._max} values)")
                    if self._stop:
                        return
                    self._next_try = time.monotonic() + self._retry_every
                continue
            with self._cv:
                for _ in batch:
                    self._pending.popleft()
                self.sent += len(batch)
                if self._down_since is not None and not self._pending:
                    self._log(f"[mlflow] tracking server {self.uri} back after "
                              f"{time.monotonic() - self._down_since:.0f} s: buffered metrics flushed"
                              f"{f', {self.dropped} values dropped (buffer full)' if self.dropped else ''}")
                    self._down_since = None

    def close(self, timeout_s: float = RETRY.tracking_close_timeout_s) -> int:
        """Stop after flushing what can be flushed within `timeout_s`. Returns the number of values not delivered
        (logged as one warning line if > 0)."""
        deadline = time.monotonic() + timeout_s
        while self.buffered and time.monotonic() < deadline:
            with self._cv:
                self._next_try = min(self._next_try, time.monotonic() + 1.0)  # try every second while closing
                self._cv.notify()
            time.sleep(0.2)
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(max(0.0, deadline - time.monotonic()) + 1.0)
        left = self.buffered
        if self._last_step is not None:  # what the faults cost, in the run itself (if the server answers)
            counts = {"tracking/outages": self.outages, "tracking/dropped_values": self.dropped,
                      "tracking/undelivered_values": left}
            self.try_call(lambda: self._client.log_batch(self.run_id, metrics=[
                Metric(k, float(v), int(time.time() * 1000), self._last_step) for k, v in counts.items()]),
                "tracking counters")
        if left:
            self._log(f"[mlflow] WARNING {left} metric values not delivered to {self.uri} (server away at the end "
                      f"of training; the run's metrics/worker_history.jsonl artefact, if written, has them all)")
        return left

    def try_call(self, fn: Callable[[], Any], what: str) -> bool:
        """Run one more MLflow call (e.g. an artefact upload) from the caller's thread; a failure is one warning
        line, never an exception. Returns whether it succeeded."""
        try:
            fn()
            return True
        except Exception as e:  # noqa: BLE001
            self._log(f"[mlflow] WARNING {what} failed at {self.uri}: {type(e).__name__}")
            return False
