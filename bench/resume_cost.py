"""Resume cost: seconds from a worker killed at a fraction of an epoch to the first step trained after the
restart, at two or more fractions (issue 17). It must not grow with the position.

    .venv/bin/python bench/resume_cost.py --images 400 --at 0.1 0.9
    .venv/bin/python bench/resume_cost.py --images 400 --at 0.1 0.9 --code /tmp/before   # another checkout

Each fraction f runs `jobs/pretrain_o365.py` (embedded local defaults: tiny model, generated Objects365-like data,
one worker, batch 2, no accumulation) in a subprocess of the checkout `--code`, for one epoch of `--images`
images, with a checkpoint and a kill (CODETR_FAULT_AT_STEP, which waits until Ray has the checkpoint) at step
k = round(f * steps per epoch); Ray Train restarts the worker from that checkpoint and the run stops 3 steps
later. From the per-step trace (CODETR_TRACE_IDS, one line per step with a unix time and the worker's pid):

    resume s = t(first step of the restarted worker) - t(step k of the killed one)

which holds Ray Train's failure detection and worker restart, the model build and checkpoint load (the same at
every f) and whatever the data path does to reach position k (the part that may grow with f). The synthetic data
is generated once into `--work` and shared by every fraction.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(code: str, work: str, images: int, frac: float, timeout: float) -> dict:
    steps = images // 2
    k = max(1, round(frac * steps))
    name = f"resume-{int(frac * 100)}-{int(time.time())}"
    trace = os.path.join(work, f"{name}.jsonl")
    env = {**os.environ, "CODETR_FAULT_AT_STEP": str(k), "CODETR_TRACE_IDS": trace,
           "CODETR_FAULT_MARKER": os.path.join(work, f"{name}.marker"), "PYTHONPATH": code}
    sets = [f"work_dir={work}", f"name={name}", f"synthetic.images={images}", "synthetic.val_images=4",
            "train.epochs=1", "train.total_batch_size=2", f"train.checkpoint_every_steps={k}",
            f"train.max_steps={k + 3}", "train.log_every_steps=1000", "eval.every_epochs=100",
            "scaling.max_failures=2", "tracking.enabled=false"]
    cmd = [sys.executable, os.path.join(code, "jobs", "pretrain_o365.py")] + [a for s in sets for a in ("--set", s)]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise SystemExit(f"run at {frac} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                         f"{proc.stderr[-3000:]}")
    with open(trace) as f:
        lines = [json.loads(x) for x in f if x.strip()]
    pids = list(dict.fromkeys(x["pid"] for x in lines))
    if len(pids) != 2:
        raise SystemExit(f"run at {frac}: expected one restart, got worker pids {pids}")
    killed = [x for x in lines if x["pid"] == pids[0] and x["step"] == k][0]
    first = [x for x in lines if x["pid"] == pids[1]][0]
    return {"fraction": frac, "kill_step": k, "steps_per_epoch": steps, "resume_s": first["t"] - killed["t"],
            "first_step_after": first["step"], "wall_s": time.time() - t0}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=400, help="training images in the epoch (batch 2: images/2 steps)")
    p.add_argument("--at", type=float, nargs="+", default=[0.1, 0.9], help="epoch fractions to kill at")
    p.add_argument("--code", default=REPO, help="checkout whose jobs/ and pipeline/ run")
    p.add_argument("--work", default=None, help="work dir shared by the runs (default: a temp dir)")
    p.add_argument("--timeout", type=float, default=900)
    args = p.parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="bench-resume-")
    rows = [run(os.path.abspath(args.code), work, args.images, f, args.timeout) for f in args.at]
    print(f"\ncode={args.code}  images={args.images}  load={os.getloadavg()[0]:.2f}")
    print(f"{'fraction':>8} {'kill step':>9} {'of':>4} {'resume s':>9} {'run wall s':>10}")
    for r in rows:
        print(f"{r['fraction']:>8.2f} {r['kill_step']:>9d} {r['steps_per_epoch']:>4d} {r['resume_s']:>9.2f} "
              f"{r['wall_s']:>10.1f}")


if __name__ == "__main__":
    main()
