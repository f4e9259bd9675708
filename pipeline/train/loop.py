"""The per-worker training function run by Ray Train's TorchTrainer.

Ray-specific lines are few and marked `# Ray:`. Everything else is plain PyTorch (see `steps.py`).

Data position: every worker reads its slice of a deterministic epoch order (`pipeline/data/plan.py`) through one
Ray Data stream for all its epochs (`pipeline/data/stream.py`), so the rows trained so far are a prefix of each
slice. The checkpoint stores the epoch's consumed rows as a few intervals (`state["data_position"]`); a resumed
run, with any world size, reads the rest of the epoch and nothing else: no image is replayed or skipped beyond the
last checkpoint interval, and the skipped rows are never read or decoded. Workers stay in lockstep (DDP) by
agreeing each micro-step whether every worker still has a batch (they have equal counts by construction).

Test / debug knobs (environment variables of the driver, forwarded to the workers in the loop config, or of the
workers themselves):
    CODETR_FAULT_AT_STEP=N    rank 0 dies (`os._exit(1)`, as a killed process would) right after optimizer step N,
                              once: it first creates the marker file CODETR_FAULT_MARKER (default
                              `<tmp>/codetr-fault-<run name>-step<N>`) and never fires while the marker exists.
                              Ray Train then restarts the worker group from the last checkpoint (FailureConfig).
                              Before dying it waits until the controller has collected the reports already made.
    CODETR_TRACE_IDS=PATH     rank 0 appends one JSON line per optimizer step to the local file PATH:
                              {"epoch", "step", "ids": image ids of that step over all workers, "t": unix time, "pid"}.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import torch

from pipeline import dist as pcoll
from pipeline import storage
from pipeline.train import artifacts as eval_artifacts
from pipeline.train import checkpoint as ckpt_io
from pipeline.train.ema import build_ema, ema_checkpoint, restore_ema
from pipeline.train.optim import build_optimizer, lr_factor, set_lr
from pipeline.train.steps import StepStats, backward_micro_batch, optimizer_step


def seed_everything(seed: int, epoch: int, rank: int) -> None:
    s = (seed * 1_000_003 + epoch * 1009 + rank) % (2**31)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def _gather_all(ids: list[int], world: int) -> list[int]:
    """Every worker's `ids`, concatenated in rank order (duplicates kept)."""
    if world == 1:
        return list(ids)
    return [i for part in pcoll.all_gather_objects(list(ids)) for i in part]


def _data_position(state: dict[str, Any], chunks: Any, log: Any) -> list[tuple[int, int]]:
    """The consumed S-intervals of the running epoch from a checkpoint's state, [] at an epoch start. A position
    of another epoch or shard layout, or an older checkpoint's id list, restarts the epoch (with a warning)."""
    pos = state.get("data_position") or {}
    if pos.get("epoch") == state["epoch"] and pos.get("chunks") == chunks.fingerprint():
        return [tuple(iv) for iv in pos.get("consumed", [])]
    if pos.get("consumed") or state.get("seen_ids"):
        log(f"[train] WARNING the checkpoint's data position (epoch {pos.get('epoch')}, layout {pos.get('chunks')}) "
            f"does not match epoch {state['epoch']} of these shards ({chunks.fingerprint()}): the epoch restarts "
            f"from its first image")
    return []


DEBUG_ENV = ("CODETR_FAULT_AT_STEP", "CODETR_FAULT_MARKER", "CODETR_TRACE_IDS", "CODETR_RECORD_COLLECTIVES",
             "CODETR_NONFINITE_AT", "CODETR_TRACE_INIT", "CODETR_FAULT_UNREPORTED")


def _knob(config: dict[str, Any], name: str) -> str:
    """A debug knob: the worker's environment, else the driver's (forwarded as `config["debug_env"]`)."""
    return os.environ.get(name) or config.get("debug_env", {}).get(name, "")


def _nonfinite_step(config: dict[str, Any], rank: int) -> int:
    """CODETR_NONFINITE_AT=RANK:STEP: this rank's loss terms become NaN in the micro-steps of optimizer step STEP
    (1-based), so only that rank sees a non-finite loss (tests of the non-finite consensus). Returns STEP on that
    rank, 0 (never) elsewhere or when unset."""
    at = _knob(config, "CODETR_NONFINITE_AT")
    r, _, step = at.partition(":")
    return int(step) if at and r == str(rank) and step.isdigit() else 0


def _trace_init(config: dict[str, Any], rank: int) -> None:
    """CODETR_TRACE_INIT=PATH: append one line "rank pid" per read of the init checkpoint (tests of init-once)."""
    path = _knob(config, "CODETR_TRACE_INIT")
    if path:
        with open(path, "a") as f:
            f.write(f"{rank} {os.getpid()}\n")


def _maybe_fault(config: dict[str, Any], step: int, rank: int, run_name: str) -> None:
    """CODETR_FAULT_AT_STEP: kill this worker (rank 0) once, right after optimizer step N (see module doc), once
    Ray's controller has taken its reports; with CODETR_FAULT_UNREPORTED=1 at once, so a checkpoint reported at
    step N is in storage but (within Ray's 2-s poll) not registered, as when a node is lost."""
    at = _knob(config, "CODETR_FAULT_AT_STEP")
    if rank != 0 or not at or int(at) != step:
        return
    marker = _knob(config, "CODETR_FAULT_MARKER") or os.path.join(
        tempfile.gettempdir(), f"codetr-fault-{run_name}-step{step}")
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # atomic: fires at most once per marker
    except FileExistsError:
        return
    os.close(fd)
    if not _knob(config, "CODETR_FAULT_UNREPORTED"):
        _wait_reports_collected()
    print(f"[train] CODETR_FAULT_AT_STEP={step}: killing rank 0 (pid {os.getpid()})", flush=True)
    os._exit(1)


def _wait_reports_collected(timeout_s: float = 120.0) -> None:
    """Block until the Train controller has taken this worker's pending `ray.train.report` results.

    Ray Train V2 (2.60) queues a report in the worker and the controller polls it every
    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s): a worker that dies within that window loses its last report, and its
    run resumes from the checkpoint before. The fault knob waits, so the test sees a well-defined resume point.
    Uses Ray's internal train context (debug path only)."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        pending = get_train_context().get_result_queue()
    except Exception:  # noqa: BLE001 - internal API moved: fall back to a few poll intervals
        time.sleep(10.0)
        return
    deadline = time.monotonic() + timeout_s
    while pending.unfinished_tasks and time.monotonic() < deadline:
        time.sleep(0.1)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. `config` holds the resolved job config (`job`), the dataset categories, the init
    checkpoint URI and the MLflow run to log to (rank 0 only)."""
    import ray.train  # Ray: the only module-level Ray use is inside this function
    import ray.train.torch

    from pipeline.config import JobConfig, dump_yaml, from_dict
    from pipeline.data.plan import ChunkTable
    from pipeline.data.stream import TrainStream
    from pipeline.eval.evaluator import evaluate_distributed
    from pipeline.models import build_model
    from pipeline.train.init import init_weights

    job = from_dict(JobConfig, config["job"])
    if _knob(config, "CODETR_RECORD_COLLECTIVES"):
        os.environ["CODETR_RECORD_COLLECTIVES"] = _knob(config, "CODETR_RECORD_COLLECTIVES")
    tcfg = job.train
    ctx = ray.train.get_context()  # Ray:
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()  # Ray:
    seed_everything(tcfg.seed, 0, rank)

    model = build_model(job.model)
    state: dict[str, Any] = {"epoch": 0, "step": 0, "data_position": {}, "best_ap": -1.0}
    optimizer = build_optimizer(model, tcfg)
    ema = build_ema(model, tcfg.ema_decay) if tcfg.ema else None

    # Ray: this stage's latest registered checkpoint (worker or driver restart); the run directory may hold a newer
    # complete one that Ray never registered (its worker's node was lost between upload and report)
    registered = ray.train.get_checkpoint()
    resume_log = print if rank == 0 else lambda _: None
    run_dir = storage.get_pyarrow_fs(config["run_dir"])
    with ckpt_io.resumable_directory(registered, log=resume_log, run_dir=run_dir) as d:
        resumed = d is not None
        if resumed:
            # verified (manifest sizes + checksums, loads); falls back to the previous checkpoint with a warning
            model.load_state_dict(ckpt_io.load_model_state(d))
            opt_state = ckpt_io.load_optional(d, ckpt_io.OPTIMIZER)
            if opt_state is not None:
                optimizer.load_state_dict(opt_state)
            state.update(ckpt_io.load_optional(d, ckpt_io.STATE) or {})
            if ema is not None and os.path.exists(os.path.join(d, ckpt_io.EMA)):
                restore_ema(ema, torch.load(os.path.join(d, ckpt_io.EMA), map_location="cpu"),
                            state.get("ema_n_averaged", 1))  # older checkpoints: at least "averaged once"
            consumed = sum(hi - lo for lo, hi in (state.get("data_position") or {}).get("consumed", []))
            resume_log(f"[train] resumed from checkpoint at epoch {state['epoch']} step {state['step']} "
                       f"({consumed} images of that epoch already trained)")
    # every rank walked the run directory itself: a rank that took another checkpoint would desynchronise the steps
    resumed_steps = pcoll.all_gather_objects(state["step"] if resumed else -1)
    if len(set(resumed_steps)) > 1:
        raise RuntimeError(f"ranks resumed at different steps {resumed_steps}; expected one checkpoint for all")
    if not resumed and config.get("init_from") and rank == 0:
        # Init once: only rank 0 reads the init checkpoint (a 1.4 GB download and unpickling for ViT-L); DDP
        # broadcasts rank 0's parameters and buffers to the other ranks when `prepare_model` wraps the model.
        report = init_weights(model, config["init_from"], config["categories"], tracking_uri=config.get("tracking_uri"))
        print(f"[train] initialised from {config['init_from']}: {report}")
        _trace_init(config, rank)

    model.to(device)
    optimizer_to(optimizer, device)
    ddp_model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})  # Ray:
    if ema is not None and not resumed:  # built after DDP's broadcast: every rank averages rank 0's init
        ema = build_ema(model, tcfg.ema_decay)
    if ema is not None:
        ema.to(device)

    per_worker = job.data.batch_size
    accum = max(1, round(tcfg.total_batch_size / (per_worker * world)))
    if rank == 0:
        print(f"[train] {world} worker(s) x batch {per_worker} x accumulation {accum} = "
              f"{per_worker * world * accum} images per step (configured {tcfg.total_batch_size})")
    chunks = ChunkTable.from_dict(config["train_chunks"])
    stream = TrainStream(job.data, chunks, rank=rank, world=world, batch=per_worker, first_epoch=state["epoch"],
                         epochs=tcfg.epochs, consumed=_data_position(state, chunks, resume_log),
                         filesystem=config.get("train_filesystem"))
    val_shard = ray.train.get_dataset_shard("val") if config.get("has_val") else None  # Ray:
    tracker = _Tracker(config, rank)
    progress = eval_artifacts.progress_for(job, per_worker, world, accum)
    config_yaml = dump_yaml(job)

    def save_and_report(metrics: dict[str, float], epoch_done: bool) -> None:
        position = (stream.position(state["epoch"], 0) if epoch_done  # the next epoch, from its start
                    else stream.position(state["epoch"], rows_done))
        trainer_state = {**state, "data_position": position, "world_size": world,
                         "ema_n_averaged": ema_checkpoint(ema)[1] if ema is not None else 0,
                         "mlflow_run_id": config.get("mlflow_run_id", "")}
        checkpoint, tmp = None, None
        upload_async = tcfg.checkpoint_upload == "async"
        if rank == 0:
            tmp = tempfile.mkdtemp(prefix="codetr-ckpt-", dir=tcfg.checkpoint_local_dir or None)
            ckpt_io.save_checkpoint(
                tmp, model_state=model.state_dict(), trainer_state=trainer_state, config_yaml=config_yaml,
                categories=config["categories"], optimizer_state=optimizer.state_dict(),
                ema_state=ema.module.state_dict() if ema is not None else None)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)  # Ray:
        mode = ray.train.CheckpointUploadMode.ASYNC if upload_async else ray.train.CheckpointUploadMode.SYNC
        ray.train.report({**metrics, "step": state["step"], "epoch": state["epoch"]}, checkpoint=checkpoint,
                         checkpoint_upload_mode=mode)  # Ray: async: Ray uploads in the background, then deletes tmp
        if tmp is not None and not upload_async:  # sync: report has copied it into the run's storage
            shutil.rmtree(tmp, ignore_errors=True)

    trace_path = _knob(config, "CODETR_TRACE_IDS")
    poison_step = _nonfinite_step(config, rank)
    max_steps = tcfg.max_steps if tcfg.max_steps > 0 else None
    done = max_steps is not None and state["step"] >= max_steps
    while not done and state["epoch"] < tcfg.epochs:
        epoch = state["epoch"]
        seed_everything(tcfg.seed, epoch, rank)
        stats, micro, rows_done = StepStats(), 0, 0
        step_ids: list[int] = []
        ddp_model.train()
        batches = stream.batches(epoch, device, size_divisor=job.data.size_divisor)
        t_wait = time.perf_counter()
        while True:
            batch = next(batches, None)
            if not pcoll.all_agree(batch is not None):  # every rank still has a batch (DDP lockstep)
                break
            t0 = time.perf_counter()
            stats.data_wait_s += t0 - t_wait
            if micro % accum == 0:  # the first micro-step of an optimizer step: its lr
                set_lr(optimizer, lr_factor(state["step"], epoch, tcfg))
            losses = backward_micro_batch(
                ddp_model, batch.images, batch.masks, batch.targets, accum=accum, device=device, amp=tcfg.amp,
                step=state["step"], nonfinite=tcfg.nonfinite, no_sync=(micro + 1) % accum != 0,
                poison=poison_step == state["step"] + 1)
            micro += 1
            rows_done += len(batch.targets)  # the same on every rank (equal slices, lockstep)
            if trace_path:
                step_ids.extend(int(t["image_id"]) for t in batch.targets)
            if losses is None:
                stats.skipped_steps += 1
                state["skipped_steps"] = state.get("skipped_steps", 0) + 1
                optimizer.zero_grad(set_to_none=True)
            else:
                stats.add(losses, len(batch.targets))
            if micro % accum == 0:
                optimizer_step(ddp_model, optimizer, tcfg.clip_grad_norm, ema)
                state["step"] += 1
                now = time.perf_counter()  # close the timing window before the stats may be reset below
                stats.compute_s += now - t0
                t0 = now
                if trace_path:
                    ids = _gather_all(step_ids, world)
                    if rank == 0:
                        with open(trace_path, "a") as f:
                            f.write(json.dumps({"epoch": epoch, "step": state["step"], "ids": ids,
                                                "t": round(time.time(), 2), "pid": os.getpid()}) + "\n")
                step_ids = []
                if state["step"] % tcfg.log_every_steps == 0:
                    metrics = {**stats.summary(world), "train/lr": optimizer.param_groups[0]["lr"] /
                               optimizer.param_groups[0]["lr_mult"]}
                    tracker.log(metrics, state["step"])
                    if rank == 0:  # one console line per log step (pipeline/train/artifacts.py)
                        print(progress.line(state["step"], epoch, metrics), flush=True)
                    stats = StepStats()
                done = max_steps is not None and state["step"] >= max_steps
                if not done and tcfg.checkpoint_every_steps and state["step"] % tcfg.checkpoint_every_steps == 0:
                    save_and_report({}, epoch_done=False)  # the final checkpoint comes after the eval below
                _maybe_fault(config, state["step"], rank, job.run_name)
            stats.compute_s += time.perf_counter() - t0
            t_wait = time.perf_counter()
            if done:
                break
        if micro % accum:  # the epoch ended inside an accumulation cycle: drop that partial gradient (drop_last)
            optimizer.zero_grad(set_to_none=True)
        # Stopped by max_steps inside the epoch: the checkpoint keeps the running epoch and its position, so a
        # later run with a larger max_steps continues this epoch instead of skipping the rest of it.
        epoch_done = not done
        if epoch_done:
            state["epoch"] = epoch + 1
        metrics: dict[str, float] = {}
        last = done or state["epoch"] >= tcfg.epochs
        if val_shard is not None and (last or state["epoch"] % job.eval.every_epochs == 0):
            eval_model = ema.module if ema is not None else model
            eval_dets: list = []
            metrics = evaluate_distributed(eval_model, val_shard, job, config["categories"], job.data.shards,
                                           device, rank, world, detections_out=eval_dets)
            if rank == 0:
                print(f"[eval] epoch {state['epoch']} step {state['step']}: " +
                      ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
                eval_artifacts.on_eval(tracker, state["step"], job, config["categories"], metrics, eval_dets)
                state["best_ap"] = max(state["best_ap"], metrics.get("val/AP", -1.0))
        tracker.log(metrics, state["step"])
        save_and_report(metrics, epoch_done=epoch_done)
    stream.close()
    tracker.close()


def optimizer_to(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    for st in optimizer.state.values():
        for k, v in st.items():
            if torch.is_tensor(v) and k != "step":
                st[k] = v.to(device)


class _Tracker:
    """Rank-0 MLflow logging of step metrics (no-op on other ranks or when tracking is off). Never blocks or
    raises: values go through a bounded buffer that a thread flushes (pipeline/tracking/buffered.py)."""

    def __init__(self, config: dict[str, Any], rank: int) -> None:
        self.enabled = rank == 0 and bool(config.get("mlflow_run_id"))
        self.uri, self.run_id = config.get("tracking_uri", ""), config.get("mlflow_run_id", "")
        self.history: list[dict[str, float]] = []
        self.buffer = None
        if self.enabled:
            from pipeline.tracking.buffered import BufferedMetrics

            self.buffer = BufferedMetrics(self.uri, self.run_id)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not metrics or self.buffer is None:
            return
        self.buffer.log(metrics, step)
        self.history.append({"step": step, **metrics})

    def close(self) -> None:
        if self.buffer is None:
            return
        self.buffer.close()
        if self.history:
            from pipeline.tracking.mlflow_tracking import log_text

            text = "\n".join(json.dumps(h) for h in self.history)
            self.buffer.try_call(lambda: log_text(self.uri, self.run_id, text, "metrics/worker_history.jsonl"),
                                 "metrics history artefact")
