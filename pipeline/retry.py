"""Every retry policy and limit of the pipeline, in one place, with the library defaults they replace and why.

Long runs (days on spot nodes, checkpoints and shards on s3://, MLflow on a server) meet transient faults: an
object store that throttles or answers 5xx for a while, a connection refused while an endpoint restarts, a
tracking server that goes away, a node that is preempted. The rule for all of them: a fault shorter than about a
minute costs nothing but time; a longer one costs at most one checkpoint interval and never corrupts what is
stored. The numbers below implement that rule; `RETRY` is the instance the code reads.

Library defaults, checked in the installed sources (botocore 1.43, s3fs 2026.9, pyarrow 25, mlflow 3.17,
ray 2.60), and what we set instead:

- botocore (under s3fs): default retry mode `legacy` (AWS_RETRY_MODE unset), 5 attempts (botocore `_retry.json`).
  Ours: `standard`, 10 attempts. Standard retries throttling (SlowDown, 429), 5xx and connection errors with
  jittered backoff `rand * min(2**i, 20)` s, so 10 attempts wait ~55 s on average (at most ~110 s).
  AWS_RETRY_MODE / AWS_MAX_ATTEMPTS in the environment still win (an operator's override).
- botocore timeouts: s3fs sets connect 5 s, read 15 s. Ours: 10 s / 60 s (a large checkpoint part on a loaded
  link needs more than 15 s).
- s3fs's own retry loop (`S3FileSystem.retries`, a class attribute): 5 tries on timeouts, HTTPClientError and
  SlowDown only; kept. It does not retry a refused connection: botocore's standard mode does.
- pyarrow `S3FileSystem` (Ray Train checkpoint upload/download, Ray Data shard reads): default
  `AwsStandardS3RetryStrategy(max_attempts=3)`, which gives up after 1.2 s against a refused connection
  (measured). Ours: 8 attempts, 56 s measured against a closed port (5: 8 s, 6: 19 s); connect 10 s, request
  60 s. pyarrow 25's `S3FileSystem.__reduce__` drops `retry_strategy` (checked), so `storage.get_pyarrow_fs`
  returns a subclass that rebuilds it when unpickled in Ray Train workers and Ray Data read tasks.
- Ray Data file reads: `DataContext.retried_io_errors` (AWS NETWORK_CONNECTION, SLOW_DOWN, 503, ...) retried
  10 times with backoff up to 32 s; kept, a second layer over pyarrow's for shard reads.
- Ray Train checkpoint upload: `pyarrow.fs.copy_files` with the storage filesystem above. A failed upload raises
  in `ray.train.report` before the report reaches the controller, so the checkpoint is never registered (the
  run's snapshot and `get_checkpoint()` list registered ones only); `FailureConfig(max_failures)` restarts the
  worker group from the last registered checkpoint. Resume also verifies checksums (pipeline/train/checkpoint.py).
- MLflow REST from the driver: `MLFLOW_HTTP_REQUEST_MAX_RETRIES=7`, backoff factor 2, timeout 120 s; kept
  (run setup and registration may wait minutes), plus `register_attempts` around the whole registration.
- MLflow REST for rank 0's step metrics: the same defaults would block a training step for minutes, so the
  metrics go through a bounded buffer drained by a thread (pipeline/tracking/buffered.py) whose calls use
  `tracking_request_retries` / `tracking_request_timeout_s`.
- Node loss: Ray waits forever for resources of a fixed-size group. With `scaling.min_workers` > 0 the stage is
  elastic, `ScalingConfig(num_workers=(min, max))` (Ray 2.60 Train V2 `ElasticScalingPolicy`): the group restarts
  from its last checkpoint on the workers that fit; gradient accumulation keeps `train.total_batch_size`.
  Not bounded here: while fewer than min_workers fit, Ray's policy waits (logging every 30 s) for resources.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    # Object store (s3fs / botocore and pyarrow S3): see the list above.
    s3_retry_mode: str = "standard"  # botocore retry mode: retries throttling, 5xx, connection errors
    s3_max_attempts: int = 10  # botocore attempts per request (first try included)
    s3fs_retries: int = 5  # s3fs's own retry loop (timeouts, SlowDown): its class default, kept (not settable)
    pyarrow_s3_max_attempts: int = 8  # pyarrow AwsStandardS3RetryStrategy attempts per request
    s3_connect_timeout_s: float = 10.0
    s3_read_timeout_s: float = 60.0
    # MLflow step metrics on rank 0 (pipeline/tracking/buffered.py).
    tracking_request_retries: int = 0  # MLflow HTTP retries per call from the logging thread (it retries itself)
    tracking_request_timeout_s: int = 10  # per MLflow HTTP call from the logging thread
    tracking_buffer_max: int = 10_000  # metric values held while the server is away; oldest dropped beyond
    tracking_retry_every_s: float = 5.0  # how often the logging thread tries an unreachable server again
    tracking_close_timeout_s: float = 30.0  # how long the end of training waits to flush what is buffered
    # Model registration at stage end (driver; each call also has MLflow's own HTTP retries).
    register_attempts: int = 3
    register_backoff_s: float = 5.0  # wait before attempt i+1 = backoff * 2**i (+ jitter)
    # Checkpoints (pipeline/train/checkpoint.py).
    min_checkpoints_kept: int = 2  # resume can fall back to the previous checkpoint if the newest is corrupt


RETRY = RetryPolicy()


def call_with_retries(fn: Callable[[], T], attempts: int, backoff_s: float, what: str,
                      log: Callable[[str], None] = print) -> T:
    """`fn()`, retried up to `attempts` times in all on any exception, waiting `backoff_s * 2**i` (x jitter 1..1.5)
    between tries; logs one line per failed try; re-raises the last exception."""
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - the caller decides what a final failure means
            first = str(e).splitlines()[0][:200] if str(e) else ""
            if i == attempts - 1:
                log(f"[retry] {what}: attempt {i + 1}/{attempts} failed ({type(e).__name__}: {first}); giving up")
                raise
            wait = backoff_s * 2**i * (1 + 0.5 * random.random())
            log(f"[retry] {what}: attempt {i + 1}/{attempts} failed ({type(e).__name__}: {first}); "
                f"retrying in {wait:.1f} s")
            time.sleep(wait)
    raise AssertionError("unreachable")
