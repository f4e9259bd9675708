"""Decode + augment throughput: Ray Data training stream vs torch DataLoader, same shards, transforms, CPU workers.

    python bench/data_throughput.py                                   # synthetic shards in a temp dir
    python bench/data_throughput.py --images 800 --passes 1
    python bench/data_throughput.py --shards s3://bucket/coco-shards --split val2017 --workers 8

Both sides read the same Parquet shards and run `pipeline.data.transforms` (train pipeline of `--policy`,
the authors' sizes unless `--tiny`) with `--workers` CPU workers:
- ours: the training stream of one worker (`TrainStream`: one Ray Data execution over all the passes, read +
  decode + augment in Ray tasks of 1 CPU, at most `--workers` at once; Ray started with exactly `--workers` CPUs),
  collate in the consuming process;
- baseline: `DataLoader(ShardDataset, num_workers=--workers, persistent_workers=True)`, twice: collating in
  the workers (the usual setup: float batches cross process boundaries) and collating in the consuming process
  (workers return uint8 samples, as our path does).
Each side runs 1 + `--passes` passes (epochs) from a cold start, timed batch by batch, and the bench prints:
start-up (seconds to the first batch: Ray Data planning and task start-up, DataLoader forks), the steady state
(images/s after the first batch), and "warm passes" (images/s over the passes after the first, the figure earlier
versions of this bench reported after an untimed warm-up pass). The ratio ours / DataLoader is given for both.
Collate (pad, float, normalise) runs on the CPU here; in training it runs on the GPU after a uint8 copy.
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
from pipeline.data.loader import ShardDataset, shard_files  # noqa: E402
from pipeline.data.stream import TrainStream, scan_chunks  # noqa: E402


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


@dataclasses.dataclass
class Timing:
    """Per-batch arrival times (seconds from the loader's creation) and sizes, pass by pass."""

    passes: list[list[tuple[float, int]]]

    @property
    def startup_s(self) -> float:
        return self.passes[0][0][0]

    @property
    def images(self) -> int:
        return sum(n for p in self.passes for _, n in p)

    def steady(self) -> float:
        """Images/s after the first batch (every pass, epoch boundaries included)."""
        flat = [x for p in self.passes for x in p]
        return sum(n for _, n in flat[1:]) / (flat[-1][0] - flat[0][0])

    def warm(self) -> float:
        """Images/s over the passes after the first (from the end of the first pass)."""
        start = self.passes[0][-1][0]
        return sum(n for p in self.passes[1:] for _, n in p) / (self.passes[-1][-1][0] - start)


def timed(passes: int, start: float, run_pass) -> Timing:
    """`run_pass()` yields batch sizes; 1 + `passes` passes, timed from `start`."""
    out = []
    for _ in range(1 + passes):
        out.append([(time.perf_counter() - start, n) for n in run_pass()])
    return Timing(out)


def bench_ray(cfg: DataConfig, split: str, batch_size: int, passes: int) -> Timing:
    start = time.perf_counter()
    chunks = scan_chunks(shard_files(cfg, split))
    stream = TrainStream(cfg, chunks, rank=0, world=1, batch=batch_size, first_epoch=0, epochs=1 + passes)
    epoch = iter(range(1 + passes))
    try:
        return timed(passes, start, lambda: (len(b) for b in stream.batches(next(epoch), "cpu",
                                                                             size_divisor=cfg.size_divisor)))
    finally:
        stream.close()


def _samples(samples: list) -> list:
    return samples


def bench_dataloader(cfg: DataConfig, split: str, batch_size: int, passes: int, collate_in_workers: bool
                     ) -> Timing:
    """collate_in_workers: the usual DataLoader setup (workers return padded, normalised float batches);
    otherwise workers return uint8 samples and the consuming process collates, as the Ray path does."""
    start = time.perf_counter()
    collate_fn = functools.partial(collate_samples, size_divisor=cfg.size_divisor)
    dataset = ShardDataset(cfg, split, train=True)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=cfg.num_workers, persistent_workers=True,
        prefetch_factor=2, collate_fn=collate_fn if collate_in_workers else _samples)
    if collate_in_workers:
        return timed(passes, start, lambda: (len(b) for b in loader))
    return timed(passes, start, lambda: (len(collate_fn(s)) for s in loader))


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
        rows = [("Ray Data stream (ours)", bench_ray(cfg, args.split, args.batch_size, args.passes))]
    finally:
        ray.shutdown()
    rows.append(("DataLoader, collate in workers",
                 bench_dataloader(cfg, args.split, args.batch_size, args.passes, collate_in_workers=True)))
    rows.append(("DataLoader, collate in main",
                 bench_dataloader(cfg, args.split, args.batch_size, args.passes, collate_in_workers=False)))

    print(f"\npolicy={args.policy}{' (tiny sizes)' if args.tiny else ''}  workers={args.workers}  "
          f"batch={args.batch_size}  passes=1+{args.passes}  shards={shards}  load={os.getloadavg()[0]:.2f}")
    print(f"{'loader':<32} {'images':>7} {'start-up s':>10} {'steady img/s':>12} {'warm passes img/s':>17}")
    for name, t in rows:
        print(f"{name:<32} {t.images:>7d} {t.startup_s:>10.2f} {t.steady():>12.1f} {t.warm():>17.1f}")
    ours, *bases = (t for _, t in rows)
    for what in ("steady", "warm"):
        o, b = getattr(ours, what)(), [getattr(t, what)() for t in bases]
        print(f"ratio ours / DataLoader ({what}) = {o / max(b):.2f} (vs the faster DataLoader setup; "
              f"{o / b[0]:.2f} vs collate in workers, {o / b[1]:.2f} vs collate in main)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
