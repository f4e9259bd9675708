"""Decode + augment throughput: Ray Data loader vs torch DataLoader, same shards, transforms, CPU workers.

    python bench/data_throughput.py                                   # synthetic shards in a temp dir
    python bench/data_throughput.py --images 64 --workers 2 --passes 2 --policy detr
    python bench/data_throughput.py --shards s3://bucket/coco-shards --split val2017 --workers 8

Both sides read the same Parquet shards and run `pipeline.data.transforms` (train pipeline of `--policy`,
the authors' sizes unless `--tiny`) with `--workers` CPU workers:
- ours: `build_dataset` (read_parquet + map_batches in Ray tasks of 1 CPU, at most `--workers` at once; Ray
  started with exactly `--workers` CPUs) -> `iter_batches` (collate in the consuming process);
- baseline: `DataLoader(ShardDataset, num_workers=--workers, persistent_workers=True)`, twice: collating in
  the workers (the usual setup: float batches cross process boundaries) and collating in the consuming process
  (workers return uint8 samples, as our path does).
Each side gets one untimed warm-up pass (Ray worker start-up, DataLoader fork), then `--passes` timed passes
over the split; images/s = images consumed as collated CPU batches / wall seconds. Prints a table and the
ratio ours / DataLoader (the faster DataLoader setup). Collate (pad, float, normalise) runs on the CPU here;
in training it runs on the GPU after a uint8 copy.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from pipeline.data.collate import collate_samples  # noqa: E402
from pipeline.data.config import TINY_AUGMENT, AugmentConfig, DataConfig  # noqa: E402
from pipeline.data.loader import ShardDataset, build_dataset, iter_batches  # noqa: E402


def make_shards(root: str, images: int, rows_per_shard: int, seed: int) -> str:
    """Synthetic COCO-format data -> shards under `root`; returns the shard URI."""
    from pipeline.data.shards import build_shards
    from pipeline.data.synthetic import SyntheticConfig, generate_dataset

    synth = SyntheticConfig(images=images, splits=("train",), seed=seed)
    src = generate_dataset(os.path.join(root, "src"), synth)
    out = os.path.join(root, "shards")
    paths = src.splits["train"]
    build_shards(paths.annotations, paths.images, out, split="train", rows_per_shard=rows_per_shard,
                 parallel=False, verbose=False)
    return out


def timed(passes: int, run_pass) -> tuple[int, float]:
    run_pass()  # warm-up, untimed
    start, count = time.perf_counter(), 0
    for _ in range(passes):
        count += run_pass()
    return count, time.perf_counter() - start


def bench_ray(cfg: DataConfig, split: str, batch_size: int, passes: int) -> tuple[int, float]:
    ds = build_dataset(cfg, split, train=True)
    return timed(passes, lambda: sum(len(b) for b in iter_batches(ds, batch_size, "cpu")))


def _samples(samples: list) -> list:
    return samples


def bench_dataloader(cfg: DataConfig, split: str, batch_size: int, passes: int, collate_in_workers: bool
                     ) -> tuple[int, float]:
    """collate_in_workers: the usual DataLoader setup (workers return padded, normalised float batches);
    otherwise workers return uint8 samples and the consuming process collates, as the Ray path does."""
    collate_fn = functools.partial(collate_samples, size_divisor=cfg.size_divisor)
    loader = torch.utils.data.DataLoader(
        ShardDataset(cfg, split, train=True), batch_size=batch_size, shuffle=True,
        num_workers=cfg.num_workers, persistent_workers=True, prefetch_factor=2,
        collate_fn=collate_fn if collate_in_workers else _samples)
    if collate_in_workers:
        return timed(passes, lambda: sum(len(b) for b in loader))
    return timed(passes, lambda: sum(len(collate_fn(s)) for s in loader))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", default=None, help="existing shard root URI (default: synthetic, temp dir)")
    p.add_argument("--split", default="train")
    p.add_argument("--images", type=int, default=160, help="synthetic images to generate")
    p.add_argument("--rows-per-shard", type=int, default=40,
                   help="synthetic images per shard file")
    p.add_argument("--workers", type=int, default=2, help="CPU workers on both sides")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--passes", type=int, default=2, help="timed passes over the split (after one warm-up)")
    p.add_argument("--policy", choices=["detr", "lsj", "none"], default="detr")
    p.add_argument("--tiny", action="store_true", help="TINY_AUGMENT sizes, not the authors'")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import ray

    tmp = None
    shards = args.shards
    if shards is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-data-")
        print(f"generating {args.images} synthetic images -> shards in {tmp.name}", flush=True)
        shards = make_shards(tmp.name, args.images, args.rows_per_shard, args.seed)
    aug = dataclasses.replace(TINY_AUGMENT if args.tiny else AugmentConfig(), policy=args.policy)
    cfg = DataConfig(shards=shards, num_workers=args.workers, map_batch_size=args.batch_size, augment=aug,
                     seed=args.seed)

    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        rows = [("Ray Data (ours)", *bench_ray(cfg, args.split, args.batch_size, args.passes))]
    finally:
        ray.shutdown()
    rows.append(("DataLoader, collate in workers",
                 *bench_dataloader(cfg, args.split, args.batch_size, args.passes, collate_in_workers=True)))
    rows.append(("DataLoader, collate in main",
                 *bench_dataloader(cfg, args.split, args.batch_size, args.passes, collate_in_workers=False)))

    print(f"\npolicy={args.policy}{' (tiny sizes)' if args.tiny else ''}  workers={args.workers}  "
          f"batch={args.batch_size}  passes={args.passes}  shards={shards}")
    print(f"{'loader':<32} {'images':>7} {'seconds':>8} {'images/s':>9}")
    for name, n, secs in rows:
        print(f"{name:<32} {n:>7d} {secs:>8.2f} {n / secs:>9.1f}")
    ours, *bases = (n / secs for _, n, secs in rows)
    print(f"ratio ours / DataLoader = {ours / max(bases):.2f} (vs the faster DataLoader setup; "
          f"{ours / bases[0]:.2f} vs collate in workers, {ours / bases[1]:.2f} vs collate in main)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
