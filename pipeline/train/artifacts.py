"""What a person looks at during training (rank 0 only): a one-line console progress per log step, and at every
evaluation MLflow artefacts: loss and AP curves, a grid of validation images with ground truth and predicted boxes,
and a per-category AP table.

    progress = Progress(total_steps)                       # in the loop, rank 0
    print(progress.line(step, epoch, metrics))             # [train] step 12/40 (30%) epoch 1 | loss 3.21 | ...
    log_eval_artifacts(tracking_uri, run_id, history, step, model, job, categories, predictions, gt)

Artefacts (MLflow, under `eval/`): loss_curves.png, ap_curves.png, predictions_step<N>.png, per_category_ap_step<N>.csv.
Pictures are drawn with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
import time
from typing import Any

import numpy as np

GRID_IMAGES = 4
GRID_SCORE = 0.3  # predicted boxes drawn at or above this score (at most GRID_MAX_BOXES per image)
GRID_MAX_BOXES = 10


class Progress:
    """ETA from the wall time since the first step seen (a resumed run counts from its resume step)."""

    def __init__(self, total_steps: int) -> None:
        self.total = int(total_steps)
        self.t0 = time.perf_counter()
        self.step0: int | None = None

    def line(self, step: int, epoch: int, metrics: dict[str, float]) -> str:
        if self.step0 is None:
            self.step0 = step - 1
        done = step - self.step0
        elapsed = time.perf_counter() - self.t0
        eta = (self.total - step) * elapsed / done if done > 0 and self.total > step else 0.0
        pct = f" ({100 * step / self.total:.0f}%)" if self.total else ""
        total = f"/{self.total}" if self.total else ""
        loss, lr = metrics.get("train/loss", float("nan")), metrics.get("train/lr", float("nan"))
        speed, wait = metrics.get("train/images_per_s", 0.0), metrics.get("train/data_wait_fraction", 0.0)
        return (f"[train] step {step}{total}{pct} epoch {epoch} | loss {loss:.4f} | lr {lr:.2e} | {speed:.1f} img/s | "
                f"data wait {100 * wait:.0f}% | ETA {_hms(eta)}")


def total_steps(epochs: int, steps_per_epoch: int, max_steps: int) -> int:
    total = epochs * steps_per_epoch
    return min(total, max_steps) if max_steps > 0 else total


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# ------------------------------------------------------------------------------------------------------------
def plot_curves(history: list[dict[str, float]], keys: list[str], title: str, ylabel: str) -> bytes | None:
    """PNG of metric `keys` over `step` from `history` rows ({"step": s, key: value, ...}); None if no data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {k: [(h["step"], h[k]) for h in history if k in h] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for k, pts in series.items():
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3, label=k)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _png(fig)


def loss_keys(history: list[dict[str, float]], limit: int = 8) -> list[str]:
    """train/loss first, then the largest loss terms of the final decoder layer, encoder and aux heads."""
    seen: dict[str, float] = {}
    for h in history:
        for k, v in h.items():
            if k.startswith("train/loss_") and "_d" not in k.split("/")[-1][5:]:
                seen[k] = abs(float(v))
    return ["train/loss"] + sorted(seen, key=lambda k: -seen[k])[: limit - 1]


def prediction_grid(samples: list[dict[str, Any]], names: list[str], score_min: float = GRID_SCORE) -> bytes:
    """PNG grid: each sample {"image": (H, W, 3) uint8, "gt_boxes": (N, 4) xyxy, "gt_labels", "boxes",
    "scores", "labels"} in source pixels; ground truth green dashed, predictions red with "name score"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = len(samples)
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, s in zip(axes.flat, samples):
        ax.imshow(s["image"])
        for (x1, y1, x2, y2), lab in zip(s["gt_boxes"], s["gt_labels"]):
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="lime", lw=1.5, ls="--"))
            ax.text(x1, y2, _name(names, lab), color="black", fontsize=6, va="top",
                    bbox={"facecolor": "lime", "alpha": 0.7, "pad": 1, "lw": 0})
        order = list(np.argsort(-np.asarray(s["scores"])))
        keep = [i for i in order if s["scores"][i] >= score_min][:GRID_MAX_BOXES]
        shown = f"{len(keep)} pred >= {score_min}"
        if not keep:  # an early model: show its 3 best guesses rather than nothing
            keep, shown = order[:3], f"top {min(3, len(order))} pred (none >= {score_min})"
        for i in keep:
            x1, y1, x2, y2 = s["boxes"][i]
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="red", lw=1.5))
            ax.text(x1, y1, f"{_name(names, s['labels'][i])} {s['scores'][i]:.2f}", color="white", fontsize=6,
                    va="bottom", bbox={"facecolor": "red", "alpha": 0.7, "pad": 1, "lw": 0})
        ax.set_title(f"image {s['image_id']}: {len(s['gt_boxes'])} GT (green dashed), {shown} (red)",
                     fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _name(names: list[str], label: int) -> str:
    return names[int(label)] if 0 <= int(label) < len(names) else str(int(label))


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def per_category_ap(predictions: list[tuple[int, dict[str, np.ndarray]]], gt: dict[str, Any], protocol: str = "coco"
                    ) -> list[dict[str, Any]]:
    """[{"category_id", "name", "AP", "AP50", "gt_instances"}] from faster-coco-eval's precision array
    (T x R x K x A x M: IoU thresholds, recall points, categories, area ranges, max dets); AP = -1 where a
    category has no ground truth."""
    import contextlib

    from faster_coco_eval import COCO, COCOeval_faster

    from pipeline.eval.detections import Detections
    from pipeline.eval.evaluator import restrict_gt

    ids = [i for i, _ in predictions]
    gt = restrict_gt(gt, ids)
    for ann in gt["annotations"]:
        ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
        ann.setdefault("iscrowd", 0)
    cats = gt["categories"]
    dets = Detections.from_predictions(predictions).coco_results([c["id"] for c in cats])
    counts = {c["id"]: 0 for c in cats}
    for a in gt["annotations"]:
        counts[a["category_id"]] = counts.get(a["category_id"], 0) + 1
    rows = [{"category_id": c["id"], "name": c.get("name", ""), "AP": -1.0, "AP50": -1.0,
             "gt_instances": counts.get(c["id"], 0)} for c in cats]
    if not len(dets):
        return rows
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(gt)
        ev = COCOeval_faster(coco_gt, coco_gt.loadRes(dets), iouType="bbox", lvis_style=protocol == "lvis",
                             print_function=lambda *a: None)
        ev.evaluate()
        ev.accumulate()
    precision = np.asarray(ev.eval["precision"])  # (T, R, K, A, M)
    cat_index = {cid: k for k, cid in enumerate(ev.params.catIds)}
    for row in rows:
        k = cat_index.get(row["category_id"])
        if k is None:
            continue
        p = precision[:, :, k, 0, -1]
        row["AP"] = float(p[p > -1].mean()) if (p > -1).any() else -1.0
        p50 = precision[0, :, k, 0, -1]
        row["AP50"] = float(p50[p50 > -1].mean()) if (p50 > -1).any() else -1.0
    return rows


def ap_table_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["category_id", "name", "AP", "AP50", "gt_instances"])
    writer.writeheader()
    for r in rows:
        writer.writerow({**r, "AP": f"{r['AP']:.4f}", "AP50": f"{r['AP50']:.4f}"})
    return buf.getvalue()


def grid_samples(job: Any, predictions: dict[int, dict[str, np.ndarray]], count: int = GRID_IMAGES
                 ) -> list[dict[str, Any]]:
    """The first `count` val images that were predicted, decoded from the shards at source size, with their
    ground truth (xyxy source pixels) and the evaluation's predictions."""
    import torch

    from pipeline.data.loader import ShardDataset
    from pipeline.data.transforms import make_sample

    ds = ShardDataset(job.data, job.data.val_split, train=False)
    out = []
    for index in range(len(ds)):
        if len(out) >= count:
            break
        row = ds.row(index)
        pred = predictions.get(int(row["image_id"]))
        if pred is None:
            continue
        sample = make_sample(row, drop_crowd=False)
        out.append({"image_id": int(row["image_id"]), "image": sample["image"].permute(1, 2, 0).numpy(),
                    "gt_boxes": sample["boxes"].as_subclass(torch.Tensor).tolist(),
                    "gt_labels": sample["labels"].tolist(),
                    "boxes": np.asarray(pred["boxes"]).reshape(-1, 4).tolist(),
                    "scores": np.asarray(pred["scores"]).reshape(-1).tolist(),
                    "labels": np.asarray(pred["labels"]).reshape(-1).tolist()})
    return out


def log_eval_artifacts(tracking_uri: str, run_id: str, history: list[dict[str, float]], step: int, job: Any,
                       categories: list[dict[str, Any]], predictions: list[tuple[int, dict[str, np.ndarray]]],
                       gt: dict[str, Any]) -> list[str]:
    """Draw and log the evaluation artefacts of `step` to the MLflow run. Returns the artefact paths logged."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    names = [str(c.get("name", i)) for i, c in enumerate(categories)]
    logged = []
    with tempfile.TemporaryDirectory(prefix="codetr-eval-art-") as tmp:
        files: dict[str, bytes | str | None] = {
            "loss_curves.png": plot_curves(history, loss_keys(history), "training losses", "loss"),
            "ap_curves.png": plot_curves(history, ["val/AP", "val/AP50", "val/AP75"], "validation AP", "AP"),
            f"predictions_step{step}.png": prediction_grid(
                grid_samples(job, dict(predictions)), names) if predictions else None,
            f"per_category_ap_step{step}.csv": ap_table_csv(per_category_ap(predictions, gt, job.eval.protocol)),
        }
        for name, data in files.items():
            if data is None:
                continue
            path = os.path.join(tmp, name)
            with open(path, "wb") as f:
                f.write(data if isinstance(data, bytes) else data.encode())
            client.log_artifact(run_id, path, "eval")
            logged.append(f"eval/{name}")
    return logged


# ------------------------------------------------------------------------------------------------------------
# the two calls of the training loop (rank 0)


def progress_for(job: Any, per_worker: int, world: int, accum: int) -> Progress:
    """Progress with the run's total optimizer steps (from the train split size in the shards' manifest)."""
    from pipeline import storage

    try:
        manifest = storage.read_json(storage.join(job.data.shards, "manifest.json"))
        images = int(manifest["splits"][job.data.train_split]["num_images"])
    except (OSError, KeyError, ValueError, TypeError):
        images = 0
    per_epoch = images // max(1, per_worker * world * accum)
    return Progress(total_steps(job.train.epochs, per_epoch, job.train.max_steps))


def on_eval(tracker: Any, step: int, job: Any, categories: list[dict[str, Any]], metrics: dict[str, float],
            detections: list[Any]) -> None:
    """Log the eval artefacts of `step` (rank 0, tracking on). Never raises: pictures must not stop training."""
    if not getattr(tracker, "enabled", False) or not detections or detections[0] is None:
        return
    try:
        from pipeline.eval.evaluator import gt_from_shards

        dets = detections[0]
        predictions = [(int(i), {"boxes": dets.boxes[s:e], "scores": dets.scores[s:e], "labels": dets.labels[s:e]})
                       for i, s, e in zip(dets.images, np.cumsum(dets.counts) - dets.counts, np.cumsum(dets.counts))]
        history = [*tracker.history, {"step": step, **metrics}]
        gt = gt_from_shards(job.data.shards, job.data.val_split)
        logged = log_eval_artifacts(tracker.uri, tracker.run_id, history, step, job, categories, predictions, gt)
        print(f"[eval] artefacts: {', '.join(logged)}", flush=True)
    except Exception as e:  # noqa: BLE001 - a failed plot is reported, the run goes on
        print(f"[eval] warning: eval artefacts not logged: {type(e).__name__}: {e}", flush=True)
