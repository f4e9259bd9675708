"""Object store faults: moto's S3 server stopped for several seconds and restarted on the same port, during a
checkpoint upload (a whole stage) and during a shard read (the loader's Ray Data dataset). The S3 clients retry
with backoff (pipeline/retry.py); the run finishes with nothing lost and no half-written checkpoint.

The session's moto server (tests/conftest.py) cannot be stopped, so these tests run their own on a fixed port, in
this process (moto keeps its buckets in process memory: a restarted server serves the same objects).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

import pytest
from fault_helpers import check_exactly_once, cost_line, read_trace, tiny_job, train_image_ids

from pipeline import storage


class Moto:
    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture()
def moto(s3_endpoint, monkeypatch):
    import s3fs

    m = Moto()
    m.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", m.url)  # the driver side; workers get the pickled filesystems
    s3fs.S3FileSystem.clear_instance_cache()
    yield m
    m.stop()
    s3fs.S3FileSystem.clear_instance_cache()


def _train_shards_on_s3(work: str, bucket: str) -> str:
    """Synthetic shards built locally, their train split uploaded (val left out: the stage has no eval)."""
    import s3fs

    from pipeline.train.driver import ensure_shards

    local = ensure_shards(tiny_job(work)).data.shards
    fs = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    fs.mkdir(bucket)
    manifest = storage.read_json(os.path.join(local, "manifest.json"))
    manifest["splits"] = {"train": manifest["splits"]["train"]}
    storage.write_json(f"s3://{bucket}/shards/manifest.json", manifest)
    fs.put(os.path.join(local, "train"), f"{bucket}/shards/train", recursive=True)
    return f"s3://{bucket}/shards"


def _outage(moto: Moto, down_when, up_when, hold_s: float, events: dict) -> threading.Thread:
    """Thread: stop moto once `down_when()`; restart it `hold_s` after `up_when()` (times in `events`)."""
    def run() -> None:
        while not down_when():
            time.sleep(0.05)
        moto.stop()
        events["down"] = time.time()
        while not up_when():
            time.sleep(0.05)
        time.sleep(hold_s)
        moto.start()
        events["up"] = time.time()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_checkpoint_upload_survives_store_outage(ray_local, moto, tmp_path, monkeypatch):
    from pipeline.train.checkpoint import verify_checkpoint

    bucket = f"fault-{uuid.uuid4().hex[:8]}"
    shards = _train_shards_on_s3(str(tmp_path), bucket)
    trace = tmp_path / "trace.jsonl"
    monkeypatch.setenv("CODETR_TRACE_IDS", str(trace))
    job = tiny_job(str(tmp_path), "name=fault-s3", f"data.shards={shards}", f"storage_path=s3://{bucket}/runs",
                   "train.max_steps=6", "train.checkpoint_every_steps=2", "tracking.enabled=false")

    def at_step(n):
        return lambda: trace.exists() and any(x["step"] >= n for x in read_trace(str(trace)))

    # Down from step 1 until 6 s after step 2: the step-2 checkpoint upload starts inside the outage.
    events: dict[str, float] = {}
    t = _outage(moto, at_step(1), at_step(2), 6.0, events)
    from pipeline.train.driver import run_stage

    res = run_stage(job)
    t.join(60)
    assert "up" in events and res.metrics["step"] == 6

    lines = read_trace(str(trace))
    assert len({x["pid"] for x in lines}) == 1, "the outage restarted the worker group"
    by_step = {x["step"]: x for x in lines}
    # the step-2 checkpoint was written while the store was down: step 3 waited for it (report is synchronous)
    blocked = by_step[3]["t"] - by_step[2]["t"]
    assert by_step[2]["t"] < events["up"] and blocked >= events["up"] - by_step[2]["t"] - 0.5
    all_ids = train_image_ids(os.path.join(str(tmp_path), "shards", "*", "train", "part-*.parquet"))
    cost = check_exactly_once(lines, all_ids, resume_step=0)

    # nothing half-written: every checkpoint on s3 verifies (manifest sizes + checksums) after a download
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=moto.url)
    ckpts = sorted(p for p in fs.ls(f"{bucket}/runs/fault-s3") if p.rsplit("/", 1)[-1].startswith("checkpoint_")
                   and fs.isdir(p))
    assert len(ckpts) == 2  # keep_checkpoints=2 of steps 2, 4, 6
    for i, p in enumerate(ckpts):
        local = tmp_path / f"dl{i}"
        local.mkdir()
        for f in fs.ls(p):
            fs.get(f, str(local / f.rsplit("/", 1)[-1]))
        assert verify_checkpoint(str(local)) == "", p
    snapshot = json.loads(fs.cat(f"{bucket}/runs/fault-s3/checkpoint_manager_snapshot.json"))
    assert snapshot  # the run's commit record is readable
    cost_line("object store down during checkpoint upload", f"moto stopped {events['up'] - events['down']:.0f} s "
              "(from step 1 to 6 s after step 2), restarted on the same port",
              "upload retried (pyarrow S3 retry strategy), same worker group finished", **cost,
              seconds_blocked=round(blocked, 1))


def test_shard_read_survives_store_outage(ray_local, moto, tmp_path):
    import ray

    from pipeline.data.loader import build_dataset

    bucket = f"fault-{uuid.uuid4().hex[:8]}"
    shards = _train_shards_on_s3(str(tmp_path), bucket)
    job = tiny_job(str(tmp_path), f"data.shards={shards}")
    ds = build_dataset(job.data, "train", train=False)
    moto.stop()
    t0 = time.time()
    restart = threading.Timer(6.0, moto.start)
    restart.start()
    rows = ds.select_columns(["image_id"]).take_all()  # read tasks start while the store is down
    took = time.time() - t0
    restart.join()
    assert took >= 6.0 - 0.5, f"read finished in {took:.1f} s, before the store came back"
    want = train_image_ids(os.path.join(str(tmp_path), "shards", "*", "train", "part-*.parquet"))
    assert sorted(r["image_id"] for r in rows) == want  # every row, none twice
    assert ray.is_initialized()
    cost_line("object store down during shard read", "moto stopped 6 s during the Ray Data shard read",
              "read retried (pyarrow + Ray Data retried_io_errors), all rows once", rows_lost=0, rows_twice=0,
              seconds_waited=round(took, 1))
