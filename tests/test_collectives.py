"""Collectives: every tensor handed to torch.distributed goes through `pipeline.dist`, on the device the backend
needs; the GPU backend string; and a two-worker (gloo) run of the real per-worker loop that records every tensor
handed to a collective, agrees on a non-finite loss seen by one rank only, and reads the init checkpoint once."""

from __future__ import annotations

import ast
import json
import pathlib
from collections import Counter

import pytest
import torch
import torch.distributed as tdist
from tiny_stage import TINY_STAGE as TINY

from pipeline import dist as pcoll
from pipeline.config import load_config

REPO = pathlib.Path(__file__).resolve().parent.parent
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "gather", "gather_object", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "scatter", "all_to_all", "barrier",
               "all_reduce_coalesced", "all_gather_into_tensor", "reduce_scatter_tensor"}


def test_backend_string_for_gpu_runs_is_mixed_and_parses() -> None:
    assert pcoll.torch_backend(use_gpu=False) == "gloo"
    gpu = pcoll.torch_backend(use_gpu=True)
    assert gpu == "cpu:gloo,cuda:nccl"
    # torch's own parser of init_process_group's backend argument: CPU tensors -> gloo, CUDA tensors -> NCCL
    parsed = tdist.distributed_c10d.BackendConfig(tdist.Backend(gpu)).get_device_backend_map()
    assert parsed == {"cpu": "gloo", "cuda": "nccl"}


@pytest.mark.parametrize(("backend", "cuda", "expected"), [
    ("gloo", False, "cpu"), ("cpu:gloo,cuda:gloo", True, "cpu"), ("nccl", True, "cuda:0"),
    ("cuda:nccl", True, "cuda:0"), ("cpu:gloo,cuda:nccl", True, "cuda:0"),
])
def test_collective_device_follows_the_backend(backend: str, cuda: bool, expected: str) -> None:
    assert str(pcoll.device_for_backend(backend, cuda)) == expected


def test_nccl_without_cuda_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="NCCL"):
        pcoll.device_for_backend("nccl", cuda_available=False)


def test_no_collective_outside_pipeline_dist() -> None:
    """Only pipeline/dist.py calls torch.distributed collectives: one place decides their devices."""
    offenders = []
    for path in (REPO / "pipeline").rglob("*.py"):
        if path.name == "dist.py" and path.parent.name == "pipeline":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
                base = node.func.value
                name = base.id if isinstance(base, ast.Name) else getattr(base, "attr", "")
                if name in ("dist", "distributed", "tdist"):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {name}.{node.func.attr}")
    assert not offenders, offenders


def test_helpers_are_identity_outside_a_process_group() -> None:
    assert not pcoll.is_distributed()
    t = torch.tensor([3.0])
    assert pcoll.reduce_mean(t) is t
    assert pcoll.all_agree(torch.tensor(False)) is False
    assert pcoll.all_gather_objects([1]) == [[1]] and pcoll.gather_objects("x") == ["x"]


def test_two_workers_record_collectives_agree_on_nonfinite_and_init_once(ray_local, tmp_path, monkeypatch):
    from pipeline.models import build_model
    from pipeline.train import checkpoint as ckpt_io
    from pipeline.train.driver import run_stage

    record, init_trace = tmp_path / "collectives.jsonl", tmp_path / "init.txt"
    monkeypatch.setenv("CODETR_RECORD_COLLECTIVES", str(record))
    monkeypatch.setenv("CODETR_NONFINITE_AT", "1:2")  # only rank 1, only optimizer step 2
    monkeypatch.setenv("CODETR_TRACE_INIT", str(init_trace))
    overrides = [*TINY, f"work_dir={tmp_path}", "name=collectives", "scaling.num_workers=2",
                 "scaling.cpus_per_worker=1", "train.total_batch_size=2", "train.max_steps=3",
                 "train.nonfinite=skip", "tracking.enabled=false", "eval.every_epochs=1"]
    job = load_config(str(REPO / "configs/local/pretrain_o365.yaml"), overrides)
    init_dir = ckpt_io.save_checkpoint(str(tmp_path / "init"), model_state=build_model(job.model).state_dict(),
                                       trainer_state={}, config_yaml="")
    job = load_config(str(REPO / "configs/local/pretrain_o365.yaml"), [*overrides, f"init.from={init_dir}"])

    res = run_stage(job)

    state = ckpt_io.load_optional(res.checkpoint_uri, ckpt_io.STATE)
    assert state["step"] == 3 and state["world_size"] == 2
    assert state["skipped_steps"] == 1, "rank 0 (finite loss) must skip the step rank 1 could not take"
    # init once: rank 0 read the checkpoint, nobody else did (DDP broadcast the weights)
    assert init_trace.read_text().split()[0::2] == ["0"]

    entries = [json.loads(line) for line in record.read_text().splitlines()]
    per_pid = Counter(e["pid"] for e in entries)
    assert len(per_pid) == 2, per_pid
    tensors = [e for e in entries if "device" in e]
    assert tensors and {e["device"] for e in tensors} == {str(pcoll.device_for_backend("gloo", False))}
    assert {e["dtype"] for e in tensors} <= {"int32", "float32"}
    # lockstep: both ranks made the same sequence of collectives
    by_pid: dict[int, list[tuple]] = {}
    for e in entries:
        by_pid.setdefault(e["pid"], []).append((e["op"], e.get("dtype"), tuple(e.get("shape", ()))))
    seq_a, seq_b = by_pid.values()
    assert seq_a == seq_b
    print(f"\n[collectives] {len(entries)} collectives per 2 ranks over 3 steps + eval: "
          f"{dict(Counter(e['op'] for e in entries))}")
