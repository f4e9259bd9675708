"""Fault tolerance of a training stage on a local Ray instance: a worker killed mid-epoch is restarted from the
last checkpoint (Ray Train FailureConfig), ends at exactly train.max_steps, and replays no image beyond the
checkpoint interval.

The kill and the per-step image trace are the loop's test knobs (pipeline/train/loop.py module doc):
CODETR_FAULT_AT_STEP / CODETR_FAULT_MARKER and CODETR_TRACE_IDS.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os

import pyarrow.parquet as pq
import pytest
from tiny_stage import TINY_STAGE as TINY

from pipeline.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_job(work_dir: str, *overrides: str):
    return load_config(os.path.join(REPO, "configs/local/pretrain_o365.yaml"),
                       [*TINY, f"work_dir={work_dir}", *overrides])


def train_image_ids(work_dir: str) -> list[int]:
    files = glob.glob(os.path.join(work_dir, "shards", "*", "train", "part-*.parquet"))
    return sorted(i for f in files for i in pq.read_table(f, columns=["image_id"]).column(0).to_pylist())


def position_ids(job, state: dict) -> list[int]:
    """The image ids a checkpoint's data position marks as trained in its epoch (read through the plan)."""
    from pipeline.data.loader import shard_files
    from pipeline.data.plan import EpochPlan
    from pipeline.data.stream import read_piece, scan_chunks

    shards = glob.glob(os.path.join(job.work_dir, "shards", "*"))[0]
    chunks = scan_chunks(shard_files(dataclasses.replace(job.data, shards=shards), job.data.train_split))
    pos = state["data_position"]
    assert pos["epoch"] == state["epoch"] and pos["chunks"] == chunks.fingerprint()
    plan = EpochPlan(chunks, job.data.seed, pos["epoch"], shuffle=True)
    return [i for c, lo, hi in plan.pieces([tuple(iv) for iv in pos["consumed"]])
            for i in read_piece(chunks, int(c), int(lo), int(hi), seed=job.data.seed, epoch=pos["epoch"],
                                shuffle=True).column("image_id").to_pylist()]


def read_trace(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow  # a worker killed and restarted; node loss and the fault_* tests cover resume in CI
def test_worker_killed_mid_epoch_resumes_from_last_checkpoint(ray_local, tmp_path, monkeypatch):
    from pipeline.train.checkpoint import load_optional
    from pipeline.train.driver import run_stage

    trace, marker = tmp_path / "trace.jsonl", tmp_path / "fault.marker"
    monkeypatch.setenv("CODETR_FAULT_AT_STEP", "3")  # after step 3; the last checkpoint is at step 2
    monkeypatch.setenv("CODETR_FAULT_MARKER", str(marker))
    monkeypatch.setenv("CODETR_TRACE_IDS", str(trace))
    job = tiny_job(str(tmp_path), "name=fault-worker", "train.max_steps=6", "train.checkpoint_every_steps=2",
                   "scaling.max_failures=2", "tracking.enabled=false")

    res = run_stage(job)

    assert marker.exists(), "the fault knob never fired"
    assert res.metrics["step"] == 6
    lines = read_trace(str(trace))
    # Stopped by max_steps inside epoch 1 (0-based): the final checkpoint holds that data position.
    state = load_optional(res.checkpoint_uri, "trainer_state.json")
    assert state["step"] == 6 and state["epoch"] == 1
    steps_5_6 = [i for line in lines if line["step"] in (5, 6) for i in line["ids"]]
    assert sorted(position_ids(job, state)) == sorted(steps_5_6)

    pids = list(dict.fromkeys(line["pid"] for line in lines))
    assert len(pids) == 2, f"expected one restart, got attempts {pids}"
    first = [line for line in lines if line["pid"] == pids[0]]
    second = [line for line in lines if line["pid"] == pids[1]]
    assert [line["step"] for line in first] == [1, 2, 3]
    assert [line["step"] for line in second] == [3, 4, 5, 6]  # resumed from the step-2 checkpoint

    # The trained timeline (the latest attempt of every step): epoch 0 saw every train image exactly once.
    final = {line["step"]: line for line in lines}
    epoch0 = [i for s in sorted(final) if final[s]["epoch"] == 0 for i in final[s]["ids"]]
    assert sorted(epoch0) == train_image_ids(str(tmp_path))
    # Replayed images: only those of the killed attempt after its last checkpoint (step 3: one interval at most).
    replayed = [i for line in first if line["step"] > 2 for i in line["ids"]]
    assert len(replayed) <= 2 * 2
    before_ckpt = {i for line in first if line["step"] <= 2 for i in line["ids"]}
    resumed_epoch0 = {i for line in second if line["epoch"] == 0 for i in line["ids"]}
    assert not before_ckpt & resumed_epoch0, "images before the checkpoint were trained again"


# slow (70-100 s): the branch it reaches (a complete checkpoint newer than Ray's) is unit-tested in
# test_fault_checkpoint.py and the loop's wiring of it runs in CI's node-loss test; this is its deterministic
# end-to-end form (`pytest -m slow`)
@pytest.mark.slow
def test_worker_killed_before_ray_took_its_checkpoint_resumes_from_it(ray_local, tmp_path, monkeypatch):
    """The race of a lost node: rank 0 reports its step-2 checkpoint (synchronous upload: complete in storage when
    `report` returns) and dies at once, before Ray's controller polls the report (every 2 s), so Ray restarts the
    worker with the checkpoint before (here none). Resume must still start at step 3: nothing trained twice."""
    from pipeline.train.driver import run_stage

    trace, marker = tmp_path / "trace.jsonl", tmp_path / "fault.marker"
    monkeypatch.setenv("CODETR_FAULT_AT_STEP", "2")
    monkeypatch.setenv("CODETR_FAULT_UNREPORTED", "1")
    monkeypatch.setenv("CODETR_FAULT_MARKER", str(marker))
    monkeypatch.setenv("CODETR_TRACE_IDS", str(trace))
    job = tiny_job(str(tmp_path), "name=fault-unreported", "train.max_steps=4", "train.checkpoint_every_steps=2",
                   "train.checkpoint_upload=sync", "scaling.max_failures=1", "tracking.enabled=false")

    res = run_stage(job)

    assert marker.exists(), "the fault knob never fired"
    assert res.metrics["step"] == 4
    lines = read_trace(str(trace))
    pids = list(dict.fromkeys(line["pid"] for line in lines))
    assert len(pids) == 2, f"expected one restart, got attempts {pids}"
    assert [x["step"] for x in lines if x["pid"] == pids[0]] == [1, 2]
    assert [x["step"] for x in lines if x["pid"] == pids[1]] == [3, 4]  # from the checkpoint Ray never registered
    first = {i for x in lines if x["pid"] == pids[0] for i in x["ids"]}
    second = {i for x in lines if x["pid"] == pids[1] for i in x["ids"]}
    assert not first & second and sorted(first | second) == train_image_ids(str(tmp_path))  # 8 images, once each
