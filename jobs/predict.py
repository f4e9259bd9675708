"""Batch inference: a registered model, an MLflow run or a checkpoint over a folder / prefix, an image list or a
shard split, with Ray Data (CPU decode tasks + an actor pool of model replicas, GPU actors when the cluster has
GPUs). Writes COCO-format detections JSON and Parquet; unreadable images are skipped, counted and listed.

    ray job submit --working-dir . -- python jobs/predict.py --model models:/codetr-coco@champion \
        --images s3://bucket/photos/ --out s3://bucket/predictions/photos --batch-size 8 --num-actors 4

    python jobs/predict.py --model models:/codetr-coco@champion --images .codetr/shards/<set> --split val
    python jobs/predict.py --model .codetr/ray_results/finetune-coco/checkpoint_... --images list.txt

--images: a folder or prefix (every .jpg/.png/... below it), a .txt list (one path or URI per line), or a shard
root (holding manifest.json; --split picks the split). --config gives the MLflow tracking URI and the
preprocessing of models that carry none. Prints the output URIs and images/s, then one JSON summary line.
"""

import json
import time

import _bootstrap  # noqa: F401  (must come first: makes `pipeline` the package)

from pipeline.cli import default_config, job_parser, load_job_config, run_main


def main() -> None:
    p = job_parser(__doc__, default_config("configs/local/finetune_coco.yaml"))
    p.add_argument("--model", required=True, help="models:/name@alias, models:/name/3, runs:/<id>/model or a "
                   "checkpoint URI")
    p.add_argument("--images", required=True, help="folder / prefix, image list (.txt) or shard root")
    p.add_argument("--out", default="", help="output URI (default: <work_dir>/predictions/<time>)")
    p.add_argument("--split", default="val", help="shard split when --images is a shard root (default: val)")
    p.add_argument("--batch-size", type=int, default=2, help="images per forward pass")
    p.add_argument("--num-actors", type=int, default=0, help="model replicas (default: #GPUs, else 1)")
    p.add_argument("--decode-tasks", type=int, default=2, help="concurrent CPU decode tasks")
    args = p.parse_args()

    def run() -> None:
        from pipeline.inference import load_for_inference
        from pipeline.inference.ray_predict import predict_dataset
        from pipeline.inference.sources import resolve_source
        from pipeline.inference.writers import write_outputs
        from pipeline.train.driver import init_ray, tracking_uri_of, work_path

        job = load_job_config(args.config, args.overrides)
        source = resolve_source(args.images, args.split)
        loaded = load_for_inference(args.model, tracking_uri_of(job), job)
        init_ray(job)
        import ray
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = True
        gpus = int(ray.cluster_resources().get("GPU", 0))
        actors = args.num_actors or max(1, gpus)
        last = [0.0]

        def progress(done: int, total: int, seconds: float) -> None:
            if seconds - last[0] >= 5 or (total and done >= total):
                last[0] = seconds
                rate = done / seconds if seconds > 0 else 0.0
                print(f"[predict] {done}{f'/{total}' if total else ''} images, {rate:.2f} images/s", flush=True)

        rows, skipped, stats = predict_dataset(loaded, source, batch_size=args.batch_size, num_actors=actors,
                                               decode_tasks=args.decode_tasks, use_gpu=gpus > 0, progress=progress)
        out = args.out or work_path(job, "predictions", time.strftime("%Y%m%d-%H%M%S"))
        summary = {"model": args.model, "images_uri": args.images, **stats}
        uris = write_outputs(out, rows, skipped, summary)
        for s in skipped:
            print(f"[predict] skipped {s['path']}: {s['error']}")
        print(f"[predict] {stats['images']} images predicted, {stats['skipped']} skipped, "
              f"{stats['images_per_s']:.2f} images/s ({stats['num_actors']} actor(s), batch {args.batch_size}, "
              f"{'GPU' if stats['gpu'] else 'CPU'})")
        for name, uri in uris.items():
            print(f"{name:>20s} {uri}")
        print(json.dumps({**summary, "out": out}))

    run_main(run)


if __name__ == "__main__":
    main()
