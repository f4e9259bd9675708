"""Export the deployed model (K = 0) to ONNX, check it with onnxruntime against the eager model, and log it in
MLflow next to the registered model (the artefacts of the run that logged the version, under `onnx/`).

    ray job submit --working-dir . -- python jobs/export.py --model models:/codetr-coco@champion --format onnx

    python jobs/export.py --model models:/codetr-coco@champion --format onnx [--nms none|hard] [--size 400x400] \
        [--images <folder or list for the parity check>] [--out model.onnx]

The graph: normalised, zero-padded images (dynamic batch and size, sides >= 65) + their sizes -> the raw top-k
boxes / scores / labels (--nms none, for soft-NMS in user code), or those through class-aware hard NMS
(--nms hard: batch_index / boxes / scores / labels); see pipeline/export/onnx.py and the README for what it
leaves to the caller. --size is only the traced example (default: the model's eval size, the LSJ canvas for an
LSJ model). Prints the parity figures and the export time, then one JSON line.
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
    p.add_argument("--nms", default="none", choices=["none", "hard"],
                   help="none: raw top-k for NMS / soft-NMS in user code; hard: class-aware hard NMS in the graph")
    p.add_argument("--size", default="", help="HxW traced example size (default from the model's preprocessing)")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--images", default="", help="images for the parity check (default: 3 generated ones)")
    p.add_argument("--out", default="", help="local .onnx path (default: a temp dir; logged to MLflow)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the export to MLflow")
    args = p.parse_args()
    if args.format != "onnx":
        fail(f"--format {args.format!r}: only 'onnx' is supported")
    def run() -> None:
        from pipeline.export.onnx import check_parity, export_onnx, padded_batch
        from pipeline.inference import load_for_inference
        from pipeline.train.driver import tracking_uri_of

        job = load_job_config(args.config, args.overrides)
        tracking_uri = tracking_uri_of(job)
        loaded = load_for_inference(args.model, tracking_uri, job)
        size = parse_size(args.size) if args.size else default_size(loaded.preprocess)
        out = args.out or os.path.join(tempfile.mkdtemp(prefix="codetr-onnx-"), "model.onnx")
        info = export_onnx(loaded.model, out, size, opset=args.opset, nms=args.nms)
        print(f"[export] {out}: opset {info.opset}, dynamic batch and size (traced at {size[0]}x{size[1]}), "
              f"top-k {info.topk}, NMS {info.nms}, exported in {info.seconds:.1f} s")
        images = [loaded.preprocess.prepare(im, i)[0] for i, im in enumerate(parity_images(args.images))]
        report = check_parity(loaded.model, out, *padded_batch(images))  # LSJ images already fill their canvas
        print(f"[export] onnxruntime vs eager on {report['batch']} images: max box diff "
              f"{report['max_box_diff_px']:.2e} px, max score diff {report['max_score_diff']:.2e}, labels equal "
              f"{report['labels_equal']}")
        summary = {"model": args.model, "onnx": out, "opset": info.opset, "example_size": list(size),
                   "nms": info.nms, "topk": info.topk, "export_s": round(info.seconds, 2), **report}
        if args.model.startswith(("models:/", "runs:/")) and not args.no_mlflow:
            where = log_next_to_model(args.model, tracking_uri, out, loaded, summary)
            print(f"[export] logged to MLflow: {where}")
            summary["mlflow"] = where
        print(json.dumps(summary))

    run_main(run)


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        fail(f"--size {text!r}: expected HxW, e.g. 800x1333")
        raise
    return h, w


def default_size(pre) -> tuple[int, int]:
    if pre.augment.policy == "lsj":
        return pre.augment.lsj_size, pre.augment.lsj_size
    if pre.augment.policy == "detr":
        return pre.eval_size[1], pre.eval_size[1]
    return 400, 400  # policy 'none' keeps source sizes: any example works, the graph is dynamic


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
