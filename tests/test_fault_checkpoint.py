"""Corrupt newest checkpoint: resume verifies a checkpoint (manifest sizes + SHA-256, model.pt loads) and falls
back to the previous one with a warning naming what was wrong.

Injection: truncate the newest checkpoint's model.pt and delete optimizer.pt of the one before it.
"""

from __future__ import annotations

import glob
import os
import time

import pytest
import torch
from fault_helpers import check_exactly_once, cost_line, read_trace, tiny_job, train_image_ids

from pipeline.train import checkpoint as ckpt_io


def _write(directory: str, step: int) -> str:
    return ckpt_io.save_checkpoint(directory, model_state={"w": torch.full((64,), float(step))},
                                   trainer_state={"step": step}, config_yaml="x: 1\n",
                                   optimizer_state={"state": {}, "param_groups": []})


def _corrupt(newest: str, older: str) -> None:
    model = os.path.join(newest, ckpt_io.MODEL)
    with open(model, "r+b") as f:
        f.truncate(os.path.getsize(model) // 2)
    os.remove(os.path.join(older, ckpt_io.OPTIMIZER))


def test_resume_falls_back_past_corrupt_checkpoints(tmp_path):
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    run = tmp_path / "run"
    dirs = [_write(str(run / f"checkpoint_2026-01-01_00-00-0{i}.000000"), i) for i in (1, 2, 3)]
    assert ckpt_io.verify_checkpoint(dirs[2]) == ""
    _corrupt(dirs[2], dirs[1])
    lines: list[str] = []
    with ckpt_io.resumable_directory(Checkpoint(dirs[2], filesystem=pafs.LocalFileSystem()), log=lines.append) as d:
        assert torch.load(os.path.join(d, ckpt_io.MODEL))["w"][0] == 1.0  # the step-1 checkpoint
    assert len(lines) == 1 and "WARNING" in lines[0] and "checkpoint_2026-01-01_00-00-01" in lines[0]
    assert "checkpoint_2026-01-01_00-00-03.000000: model.pt has" in lines[0]  # truncated: size differs
    assert "checkpoint_2026-01-01_00-00-02.000000: optimizer.pt missing" in lines[0]
    # a checksum catches a same-size overwrite; nothing left to fall back to is an error naming every problem
    with open(os.path.join(dirs[0], ckpt_io.MODEL), "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xfe")
    assert "checksum" in ckpt_io.verify_checkpoint(dirs[0])
    newest = Checkpoint(dirs[2], filesystem=pafs.LocalFileSystem())
    with (pytest.raises(RuntimeError, match="no checkpoint of this run verifies.*00-00-01.000000: model.pt checksum"),
          ckpt_io.resumable_directory(newest, log=lines.append)):
        pass


def test_resume_takes_a_newer_checkpoint_ray_never_registered(tmp_path):
    """A node lost between a checkpoint's upload and Ray's poll of its report: the directory is complete in the
    run's storage but `ray.train.get_checkpoint()` returns the one before (or None). Resume takes the newest that
    verifies; a half-uploaded newest (no manifest yet) is skipped; a run with only leftovers starts anew."""
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    fs, run = pafs.LocalFileSystem(), tmp_path / "run"
    dirs = [_write(str(run / f"checkpoint_2026-01-01_00-00-0{i}.000000"), i) for i in (1, 2, 3)]
    (run / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray's file beside them: not a candidate
    lines: list[str] = []
    with ckpt_io.resumable_directory(Checkpoint(dirs[1], filesystem=fs), log=lines.append) as d:
        assert torch.load(os.path.join(d, ckpt_io.MODEL))["w"][0] == 3.0
    assert len(lines) == 1 and "00-00-03.000000, a complete checkpoint Ray had not registered" in lines[0]
    assert "Ray's latest: checkpoint_2026-01-01_00-00-02.000000" in lines[0]
    lines.clear()
    with ckpt_io.resumable_directory(None, log=lines.append, run_dir=(fs, str(run))) as d:  # Ray registered none
        assert torch.load(os.path.join(d, ckpt_io.MODEL))["w"][0] == 3.0
    assert "Ray's latest: none" in lines[0]

    os.remove(os.path.join(dirs[2], ckpt_io.MANIFEST))  # the newest was still uploading when its node died
    lines.clear()
    with ckpt_io.resumable_directory(Checkpoint(dirs[1], filesystem=fs), log=lines.append) as d:
        assert torch.load(os.path.join(d, ckpt_io.MODEL))["w"][0] == 2.0  # Ray's own, no "not registered" line
    assert len(lines) == 1 and "WARNING resuming from the older checkpoint checkpoint_2026-01-01_00-00-02" in lines[0]

    for p in dirs[:2]:
        os.remove(os.path.join(p, ckpt_io.MANIFEST))
    lines.clear()
    with ckpt_io.resumable_directory(None, log=lines.append, run_dir=(fs, str(run))) as d:
        assert d is None
    assert len(lines) == 1 and lines[0].startswith("[train] WARNING starting anew") and "00-00-01" in lines[0]
    with ckpt_io.resumable_directory(None, log=lines.append, run_dir=(fs, str(tmp_path / "new-run"))) as d:
        assert d is None  # a new run: nothing there, nothing said
    assert len(lines) == 1


def test_stage_resumes_from_last_good_checkpoint(ray_local, tmp_path, monkeypatch):
    from pipeline.train.driver import run_stage

    trace = tmp_path / "trace.jsonl"
    monkeypatch.setenv("CODETR_TRACE_IDS", str(trace))
    common = ["name=fault-ckpt", "train.checkpoint_every_steps=1", "train.keep_checkpoints=3",
              "tracking.enabled=false"]
    first = run_stage(tiny_job(str(tmp_path), "train.max_steps=3", *common))
    run_dir = os.path.dirname(first.checkpoint_uri)
    ckpts = sorted(p for p in glob.glob(os.path.join(run_dir, "checkpoint_*")) if os.path.isdir(p))
    assert len(ckpts) == 3 and ckpts[-1] == first.checkpoint_uri
    _corrupt(ckpts[2], ckpts[1])  # steps 3 and 2 unusable: the step-1 checkpoint is the last good one

    t0 = time.monotonic()
    second = run_stage(tiny_job(str(tmp_path), "train.max_steps=5", *common))
    took = time.monotonic() - t0

    assert second.metrics["step"] == 5
    lines = read_trace(str(trace))
    runs = [[x for x in lines if x["pid"] == p] for p in dict.fromkeys(x["pid"] for x in lines)]
    assert [x["step"] for x in runs[0]] == [1, 2, 3]
    assert [x["step"] for x in runs[-1]] == [2, 3, 4, 5]  # resumed from the step-1 checkpoint
    all_ids = train_image_ids(os.path.join(str(tmp_path), "shards", "*", "train", "part-*.parquet"))
    cost = check_exactly_once(lines, all_ids, resume_step=1)
    assert cost["steps_replayed"] == 2  # two corrupt checkpoints = two checkpoint intervals, no more
    cost_line("corrupt newest checkpoint", "truncate newest model.pt, delete optimizer.pt of the previous one",
              "resume verified both, warned, resumed from the third newest", **cost,
              resume_run_s=round(took, 1))
