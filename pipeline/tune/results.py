"""A finished search, summarised: one row per trial, the printed table, CSV, the AP plot, MLflow runs.

Parent run (named after the search): params `search.*`, `search_config.yaml`, `results.csv` (trial, lambda1,
lambda2, K, aux heads, other searched fields, AP, steps, epochs, stopped early, status, checkpoint,
child run),
`ap_vs_lambda.png` (AP against lambda1 and lambda2, one series per aux-head set; hollow = stopped early),
`best_config.yaml`, tags `best_trial` / `best_checkpoint_uri` / `best_run_id`, metric `best/<metric>`.
Child runs (one per trial, nested with `mlflow.parentRunId`): closed here with status FINISHED (reached
max_t), KILLED (stopped early by ASHA: the trial's process was ended, so it could not close its own run) or
FAILED, and
tags `tune.status`, `tune.stop_reason`, `tune.stopped_early`.
"""

from __future__ import annotations

import csv
import io
import math
import os
from typing import TYPE_CHECKING, Any

from pipeline import storage
from pipeline.config import JobConfig, dump_yaml, flatten
from pipeline.tune.space import (
    SearchConfig,
    TuneJobConfig,
    apply_params,
    decode_params,
    label,
    trial_run_name,
)

if TYPE_CHECKING:
    from pipeline.tune.search import SearchResult

STANDARD = ("model.co.lambda1", "model.co.lambda2", "model.co.aux_heads")


def _metric_col(search: SearchConfig) -> str:
    return "AP" if search.metric == "val/AP" else search.metric


def trial_rows(grid: Any, search: SearchConfig, base: JobConfig, storage_root: str) -> list[dict[str, Any]]:
    """One dict per trial of a Tune ResultGrid (sorted by trial id)."""
    sched = search.scheduler
    rows = []
    for r in grid:
        trial_id = os.path.basename(str(r.path).rstrip("/")).removeprefix("trial_")
        m = dict(r.metrics or {})
        params = decode_params(search.space, r.config)
        job = apply_params(base, params)
        t = m.get(sched.time_attr)
        if r.error is not None:
            status, reason = (
                "error",
                f"error: {str(r.error).strip().splitlines()[-1][:300] if str(r.error) else ''}",
            )
        elif not m.get("done"):
            status, reason = "unfinished", "the search was interrupted before this trial ended"
        elif t is None:
            status, reason = "no result", "ended before its first evaluation"
        elif t < sched.max_t:
            status = "stopped early" if sched.type == "asha" else "stopped"
            reason = (
                f"stopped by ASHA at {sched.time_attr} {t} (max_t {sched.max_t}): {search.metric} below the "
                f"rung's cutoff"
            )
        else:
            status, reason = "completed", f"reached max_t = {sched.max_t} {sched.time_attr}s"
        ckpt = m.get("checkpoint_path") or ""
        if ckpt and not storage.is_local(storage_root) and "://" not in ckpt:
            ckpt = f"{storage_root.split('://', 1)[0]}://{ckpt}"
        row: dict[str, Any] = {
            "trial": trial_id,
            "lambda1": job.model.co.lambda1,
            "lambda2": job.model.co.lambda2,
            "K": len(job.model.co.aux_heads),
            "aux_heads": label(job.model.co.aux_heads),
        }
        row.update({k: label(v) for k, v in params.items() if k not in STANDARD})
        row.update(
            {
                _metric_col(search): m.get(search.metric),
                "steps": _count(m.get("step")),
                "epochs": _count(m.get("epoch")),
                "stopped_early": status == "stopped early",
                "status": status,
                "stop_reason": reason,
                "checkpoint": ckpt,
                "mlflow_run": trial_run_name(search.name, trial_id),
                "mlflow_run_id": "",
                "params": params,
            }
        )
        rows.append(row)
    return sorted(rows, key=lambda r: r["trial"])


def _count(v: Any) -> int | None:
    return int(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def best_row(rows: list[dict[str, Any]], search: SearchConfig) -> dict[str, Any] | None:
    """The trial with the best last-reported metric (ties: the one trained longer)."""
    col = _metric_col(search)
    scored = [r for r in rows if isinstance(r.get(col), int | float) and math.isfinite(r[col])]
    if not scored:
        return None
    sign = 1.0 if search.mode == "max" else -1.0
    return max(scored, key=lambda r: (sign * r[col], r["steps"] or 0))


def _columns(rows: list[dict[str, Any]], search: SearchConfig, full: bool) -> list[str]:
    extra = [k for k in search.space if k not in STANDARD]
    cols = [
        "trial",
        "lambda1",
        "lambda2",
        "K",
        "aux_heads",
        *extra,
        _metric_col(search),
        "steps",
        "epochs",
        "stopped_early",
        "status",
    ]
    if full:
        cols += ["stop_reason", "checkpoint", "mlflow_run", "mlflow_run_id"]
    return cols


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def format_table(rows: list[dict[str, Any]], search: SearchConfig) -> str:
    """Fixed-width text table (markdown pipes, so it pastes into a note)."""
    cols = _columns(rows, search, full=False)
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    out = [line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in cells]
    return "\n".join(out)


def to_csv(rows: list[dict[str, Any]], search: SearchConfig) -> str:
    cols = _columns(rows, search, full=True)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    for r in rows:
        w.writerow(["" if r.get(c) is None else r.get(c) for c in cols])
    return buf.getvalue()


def plot_ap(rows: list[dict[str, Any]], search: SearchConfig, path: str) -> str:
    """AP against lambda1 and lambda2 (log x), one colour per aux-head set; hollow markers: stopped early."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    col = _metric_col(search)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    groups = sorted({(r["K"], r["aux_heads"]) for r in rows})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, lam in zip(axes, ("lambda1", "lambda2")):
        for gi, (k, heads) in enumerate(groups):
            color = colors[gi % len(colors)]
            for early in (False, True):
                pts = [
                    (r[lam], r[col])
                    for r in rows
                    if (r["K"], r["aux_heads"]) == (k, heads)
                    and r[col] is not None
                    and r["stopped_early"] == early
                ]
                if pts:
                    ax.scatter(
                        *zip(*pts),
                        s=50,
                        edgecolors=color,
                        facecolors="none" if early else color,
                        label=f"K={k} {heads}{' (stopped early)' if early else ''}",
                    )
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.set_xlabel(lam)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(search.metric)
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(f"search {search.name}: last {search.metric} per trial")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_artifacts(res: SearchResult, search: SearchConfig, out_dir: str) -> dict[str, str]:
    """results.csv, ap_vs_lambda.png, best_config.yaml in a local directory (logged to the parent run too)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "results.csv": os.path.join(out_dir, "results.csv"),
        "ap_vs_lambda.png": os.path.join(out_dir, "ap_vs_lambda.png"),
    }
    with open(paths["results.csv"], "w") as f:
        f.write(to_csv(res.rows, search))
    plot_ap(res.rows, search, paths["ap_vs_lambda.png"])
    if res.best_config is not None:
        paths["best_config.yaml"] = os.path.join(out_dir, "best_config.yaml")
        with open(paths["best_config.yaml"], "w") as f:
            f.write(
                f"# best trial {res.best['trial']} of search {res.name}: {search.metric} "  # type: ignore[index]
                f"{_fmt(res.best[_metric_col(search)])}\n# checkpoint: {res.best_checkpoint_uri}\n"
            )  # type: ignore[index]
            f.write(dump_yaml(res.best_config))
    return paths


# ------------------------------------------------------------------------------------------------------------
# MLflow


def log_search_inputs(tracking_uri: str, parent_run_id: str, cfg: TuneJobConfig) -> None:
    from pipeline.tracking import mlflow_tracking as mt

    mt.log_params(tracking_uri, parent_run_id, flatten(cfg.search, "search"))
    mt.log_text(tracking_uri, parent_run_id, dump_yaml(cfg), "search_config.yaml")


def _find_run(client: Any, experiment: str, name: str) -> Any:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    found = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`mlflow.runName` = '{name}'", max_results=1
    )
    return found[0] if found else None


def close_child_runs(
    tracking_uri: str, rows: list[dict[str, Any]], search: SearchConfig, experiment: str
) -> None:
    """Status and stop reason on each trial's child run (fills `mlflow_run_id` in the rows)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    for r in rows:
        run = _find_run(client, experiment, r["mlflow_run"])
        if run is None:
            continue
        r["mlflow_run_id"] = run.info.run_id
        if r["status"] == "unfinished":
            continue
        for k, v in (
            ("tune.status", r["status"]),
            ("tune.stop_reason", r["stop_reason"]),
            ("tune.stopped_early", str(r["stopped_early"]).lower()),
        ):
            client.set_tag(run.info.run_id, k, v)
        status = {"completed": "FINISHED", "error": "FAILED"}.get(r["status"], "KILLED")
        if run.info.status != status:
            client.set_terminated(run.info.run_id, status=status)


def log_parent(tracking_uri: str, parent_run_id: str, res: SearchResult, search: SearchConfig) -> None:
    from pipeline.tracking import mlflow_tracking as mt

    mt.log_text(tracking_uri, parent_run_id, to_csv(res.rows, search), "results.csv")
    for name, path in res.artifacts.items():
        if name != "results.csv":
            mt.log_file(tracking_uri, parent_run_id, path)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    if res.best:
        for k, v in (
            ("best_trial", res.best["trial"]),
            ("best_checkpoint_uri", res.best_checkpoint_uri),
            ("best_run_id", res.best.get("mlflow_run_id", "")),
            ("best_model_uri", res.model_uri),
        ):
            if v:
                client.set_tag(parent_run_id, k, v)
    counts = {
        "trials": len(res.rows),
        "trials_stopped_early": sum(r["stopped_early"] for r in res.rows),
        "trials_completed": sum(r["status"] == "completed" for r in res.rows),
        "trials_failed": sum(r["status"] == "error" for r in res.rows),
        "wall_s": res.wall_s,
    }
    if res.best:
        counts[f"best/{search.metric}"] = res.best[_metric_col(search)]
    mt.log_metrics(tracking_uri, parent_run_id, counts, step=0)
    mt.end_run(tracking_uri, parent_run_id, "FINISHED")


def register_best(job: JobConfig, best: dict[str, Any], tracking_uri: str) -> str:
    """Register the best trial's model on its child run (codetr-<dataset>, alias champion if it beats it)."""
    from pipeline.models import build_model
    from pipeline.tracking import mlflow_tracking as mt
    from pipeline.train.checkpoint import load_model_state

    manifest = storage.read_json(storage.join(job.data.shards, "manifest.json"))
    model = build_model(job.model)
    model.load_state_dict(load_model_state(best["checkpoint"], prefer_ema=job.train.ema))
    model.categories = [
        {k: c[k] for k in ("id", "name", "frequency") if k in c} for c in manifest["categories"]
    ]
    model.eval()
    name = job.tracking.register_as or f"codetr-{job.dataset}"
    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = best.get("AP")
    version, champion = mt.log_and_register_model(
        tracking_uri,
        best["mlflow_run_id"],
        model,
        name,
        float(ap) if ap is not None else -1.0,
        code_paths=[package_dir],
    )
    print(
        f"[mlflow] registered the best trial's model as models:/{name}/{version}"
        f"{' (champion)' if champion else ''}"
    )
    return f"models:/{name}/{version}"
