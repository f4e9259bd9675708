"""Export the deployed model (K = 0) to ONNX, check it with onnxruntime against the eager model, and log it in
MLflow next to the registered model (the artefacts of the run that logged the version, under `onnx/`).

    ray job submit --working-dir . -- python jobs/export.py --model models:/codetr-coco@champion --format onnx

    python jobs/export.py --model models:/codetr-coco@champion --format onnx --nms none --canvas 400x400 \
        [--images <folder or list for the parity check>] [--out model.onnx]

The graph: normalised images on a fixed canvas (dynamic batch) + their sizes -> raw top-k boxes / scores /
labels (see pipeline/export/onnx.py and the README for what it leaves to the caller). --canvas defaults to the
longest eval side squared (detr policy) or the LSJ canvas. Prints the parity figures and the export time, then
one JSON line.
"""

import json
import os
import tempfile

import _bootstrap  # noqa: F401  (must come first: makes `pipeline` the package)

from pipeline.cli import default_config, fail, job_parser, load_job_config, run_main


def main() -> None:
    p = job_parser(__doc__, default_config("configs/local/finetune_coco.yaml"))
    p.add_argument("--model", required=True, help="models:/..., runs:/... or a checkpoint URI")
    p.add_argument("--format", default="onnx", help="export format (onnx)")
    p.add_argument("--nms", default="none", help="none: raw top-k for NMS / soft-NMS in user code")
    p.add_argument("--canvas", default="", help="HxW input canvas (default from the model's preprocessing)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--images", default="", help="images for the parity check (default: 3 generated ones)")
    p.add_argument("--out", default="", help="local .onnx path (default: a temp dir; logged to MLflow)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the export to MLflow")
    args = p.parse_args()
    if args.format != "onnx":
        fail(f"--format {args.format!r}: only 'onnx' is supported")
    if args.nms != "none":
        fail(f"--nms {args.nms!r}: only 'none' (raw top-k, NMS in the caller) is exported; hard NMS inside the "
             f"graph is not implemented")

    def run() -> None:
        from pipeline.export.onnx import canvas_batch, check_parity, export_onnx
        from pipeline.inference import load_for_inference
        from pipeline.train.driver import tracking_uri_of

        job = load_job_config(args.config, args.overrides)
        tracking_uri = tracking_uri_of(job)
        loaded = load_for_inference(args.model, tracking_uri, job)
        canvas = parse_canvas(args.canvas) if args.canvas else default_canvas(loaded.preprocess)
        out = args.out or os.path.join(tempfile.mkdtemp(prefix="codetr-onnx-"), "model.onnx")
        info = export_onnx(loaded.model, out, canvas, opset=args.opset)
        print(f"[export] {out}: opset {info.opset}, canvas {canvas[0]}x{canvas[1]}, top-k {info.topk}, "
              f"exported in {info.seconds:.1f} s")
        images = [loaded.preprocess.prepare(im, i)[0] for i, im in enumerate(parity_images(args.images))]
        report = check_parity(loaded.model, out, *canvas_batch(images, canvas))
        print(f"[export] onnxruntime vs eager on {report['batch']} images: max box diff "
              f"{report['max_box_diff_px']:.2e} px, max score diff {report['max_score_diff']:.2e}, labels equal "
              f"{report['labels_equal']}")
        summary = {"model": args.model, "onnx": out, "opset": info.opset, "canvas": list(canvas), "topk": info.topk,
                   "export_s": round(info.seconds, 2), **report}
        if args.model.startswith(("models:/", "runs:/")) and not args.no_mlflow:
            where = log_next_to_model(args.model, tracking_uri, out, loaded, summary)
            print(f"[export] logged to MLflow: {where}")
            summary["mlflow"] = where
        print(json.dumps(summary))

    run_main(run)


def parse_canvas(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        fail(f"--canvas {text!r}: expected HxW, e.g. 800x1333")
        raise
    return h, w


def default_canvas(pre) -> tuple[int, int]:
    if pre.augment.policy == "lsj":
        return pre.augment.lsj_size, pre.augment.lsj_size
    if pre.augment.policy == "detr":
        return pre.eval_size[1], pre.eval_size[1]
    fail("augment policy 'none' keeps source sizes: give --canvas HxW")
    raise AssertionError


def parity_images(uri: str) -> list:
    """Up to 3 images: from --images (folder / list), else generated."""
    import io

    import numpy as np
    from PIL import Image

    from pipeline import storage
    from pipeline.inference.preprocess import decode_image_bytes
    from pipeline.inference.sources import resolve_source

    if uri:
        items = resolve_source(uri).items[:3]
        return [decode_image_bytes(storage.read_bytes(it["path"]), it["path"]) for it in items]
    out = []
    for seed, (h, w) in enumerate([(120, 200), (200, 150), (90, 90)]):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
        out.append(decode_image_bytes(buf.getvalue()))
    return out


def log_next_to_model(model_uri: str, tracking_uri: str, path: str, loaded, summary: dict) -> str:
    """Log the .onnx, categories and parity report under `onnx/` of the run that logged the model."""
    import mlflow
    from mlflow.models import get_model_info

    from pipeline.tracking.mlflow_tracking import normalize_model_uri

    mlflow.set_tracking_uri(tracking_uri)
    run_id = get_model_info(normalize_model_uri(model_uri)).run_id
    client = mlflow.MlflowClient(tracking_uri)
    client.log_artifact(run_id, path, "onnx")
    client.log_dict(run_id, loaded.categories, "onnx/categories.json")
    client.log_dict(run_id, {**summary, "preprocess": loaded.preprocess.to_json()}, "onnx/export.json")
    return f"runs:/{run_id}/onnx/{os.path.basename(path)}"


if __name__ == "__main__":
    main()
