"""Data-wait fraction of a local training run, from its MLflow metrics (issue 17): overall, without the first
step of each epoch, and each epoch's first-step wait.

    .venv/bin/python bench/data_wait.py --images 128 --epochs 4
    .venv/bin/python bench/data_wait.py --images 128 --epochs 4 --code /tmp/before     # another checkout

Runs `jobs/pretrain_o365.py` (embedded local defaults: tiny model, generated Objects365-like data, one worker,
batch 2, accumulation 2) from the checkout `--code` for `--epochs` epochs with `train.log_every_steps=1`, then
reads the run's `train/data_wait_fraction` and `train/images_per_s` histories from its SQLite MLflow. One optimizer
step's wall is total_batch / images_per_s (the loop's own definition), its data wait fraction x wall; the first
step of epoch e is step e * steps_per_epoch + 1. Evaluation runs only after the last epoch.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_BATCH = 4


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--code", default=REPO, help="checkout whose jobs/ and pipeline/ run")
    p.add_argument("--work", default=None, help="work dir (default: a temp dir)")
    args = p.parse_args(argv)
    code = os.path.abspath(args.code)
    work = args.work or tempfile.mkdtemp(prefix="bench-wait-")
    name = f"wait-{int(time.time())}"
    sets = [f"work_dir={work}", f"name={name}", f"synthetic.images={args.images}", "synthetic.val_images=8",
            f"train.epochs={args.epochs}", f"train.total_batch_size={TOTAL_BATCH}", "train.log_every_steps=1",
            "train.checkpoint_every_steps=0", f"eval.every_epochs={args.epochs}", "tracking.enabled=true"]
    cmd = [sys.executable, os.path.join(code, "jobs", "pretrain_o365.py")] + [a for s in sets for a in ("--set", s)]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=code, env={**os.environ, "PYTHONPATH": code}, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode:
        raise SystemExit(f"run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")

    import mlflow

    client = mlflow.MlflowClient(tracking_uri="sqlite:///" + os.path.join(work, "mlflow.db"))
    run_id = None
    for exp in client.search_experiments():
        for r in client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.runName = '{name}'"):
            run_id = r.info.run_id
    if run_id is None:
        raise SystemExit(f"no MLflow run named {name} in {client.tracking_uri}")
    frac = {m.step: m.value for m in client.get_metric_history(run_id, "train/data_wait_fraction")}
    ips = {m.step: m.value for m in client.get_metric_history(run_id, "train/images_per_s")}
    steps = sorted(frac)
    per_epoch = len(steps) // args.epochs
    step_wall = {s: TOTAL_BATCH / ips[s] for s in steps if ips[s] > 0}
    wait = {s: frac[s] * step_wall[s] for s in step_wall}
    firsts = {e * per_epoch + 1 for e in range(args.epochs)}
    total_w, total = sum(wait.values()), sum(step_wall.values())
    rest_w = sum(w for s, w in wait.items() if s not in firsts)
    rest = sum(w for s, w in step_wall.items() if s not in firsts)
    print(f"\ncode={code}  images={args.images}  epochs={args.epochs}  steps={len(steps)} ({per_epoch}/epoch)  "
          f"job wall={wall:.0f} s  load={os.getloadavg()[0]:.2f}")
    print(f"data-wait fraction, every step: {total_w / total:.3f} ({total_w:.1f} of {total:.1f} s)")
    print(f"data-wait fraction, first step of each epoch left out: {rest_w / rest:.3f} "
          f"({rest_w:.1f} of {rest:.1f} s)")
    print("first step of each epoch, data wait s: " +
          ", ".join(f"e{e}: {wait.get(e * per_epoch + 1, float('nan')):.2f}" for e in range(args.epochs)))


if __name__ == "__main__":
    main()
