"""Argument parsing shared by the jobs: `--config PATH` and repeated `--set key.path=value`; bad input exits 2
with a one-line reason."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.config import ConfigError, JobConfig, load_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def job_parser(doc: str | None, default_config: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0] if doc else None,
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    shown = os.path.relpath(default_config, REPO_ROOT) if default_config else "none"
    p.add_argument("--config", default=default_config, help=f"YAML job config (default: {shown})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set model.co.lambda1=0.5 (repeatable)")
    return p


def default_config(relpath: str) -> str:
    return os.path.join(REPO_ROOT, relpath)


def load_job_config(path: str | None, overrides: Sequence[str]) -> JobConfig:
    try:
        return load_config(path, overrides)
    except (ConfigError, ValueError) as e:
        fail(str(e))
        raise  # unreachable


def fail(msg: str, code: int = 2) -> None:
    print(f"error: {msg.splitlines()[0] if msg else 'failed'}", file=sys.stderr)
    raise SystemExit(code)


def run_main(main: Callable[[], Any]) -> None:
    """Run a job's main; known bad-input errors become one line on stderr and exit code 2."""
    from pipeline.train.driver import StageError

    try:
        main()
    except (ConfigError, StageError, FileNotFoundError, PermissionError, OSError, ValueError) as e:
        fail(f"{type(e).__name__}: {e}")


def print_stage_result(res: Any) -> None:
    print("")
    print(f"run:         {res.run_name}")
    print(f"checkpoint:  {res.checkpoint_uri}")
    if res.mlflow_run_id:
        print(f"mlflow run:  {res.tracking_uri} run_id={res.mlflow_run_id}")
    if res.model_uri:
        print(f"registered:  {res.model_uri} (= models:/{res.registered_name}@latest"
              f"{f', models:/{res.registered_name}@champion' if res.champion else ''})")
    ap = res.metrics.get("val/AP")
    if ap is not None:
        print(f"val AP:      {ap:.4f}  (AP50 {res.metrics.get('val/AP50', float('nan')):.4f})")


def stage_job(doc: str | None, default: str, argv: Sequence[str] | None = None) -> None:
    """Body of the stage jobs (pretrain / finetune): parse, train, register, print where everything went."""
    from pipeline.train.driver import run_stage

    args = job_parser(doc, default_config(default)).parse_args(argv)

    def main() -> None:
        job = load_job_config(args.config, args.overrides)
        print_stage_result(run_stage(job))

    run_main(main)
