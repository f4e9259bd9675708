"""The data side of a resume at a larger scale than `bench/resume_cost.py` can train: seconds from a new training
stream positioned at a fraction f of an epoch to its first batch, and the rows it will read (issue 17).

    .venv/bin/python bench/resume_stream.py --images 4000 --at 0.1 0.5 0.9 --repeats 3

`resume_cost.py` times the whole restart (Ray Train, model, checkpoint, data) but trains every step up to the
kill, so its epochs are small. Here no model runs: shards of `--images` generated images (rows of 256 per row
group, the writer's default), then for each f (interleaved over `--repeats`) a fresh process with its own local
Ray and in it a `TrainStream` of one worker whose position is "the first f of the epoch's sequence consumed",
as a checkpoint would give it, timed from its construction (planning included) to its first batch. Rows read =
what the stream reads for the rest of the epoch; it should be (1 - f) of the epoch, and the time to the first
batch should not grow with f.

A fresh process per measurement, as a restarted training worker is: the first-batch time includes starting
the decode worker processes (importing torch), the same at every f. In one session the figures depend on the
previous stream instead: closing a stream cancels its tasks and Ray replaces their worker processes, so a stream
after one with few pieces (f = 0.9) found a worker ready and came 4 s earlier (and `ray.shutdown()` right after
closing a stream can end the process: Ray Data's threads still touch the core worker). The old loader decoded every row
of the epoch up to the resume point before its first batch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from child_result import emit, run  # noqa: E402
from data_throughput import make_shards  # noqa: E402

from pipeline.data.config import DataConfig  # noqa: E402
from pipeline.data.loader import shard_files  # noqa: E402
from pipeline.data.stream import TrainStream, scan_chunks  # noqa: E402


def first_batch_s(cfg: DataConfig, frac: float, batch: int) -> tuple[float, int]:
    """(seconds to the first batch, rows the stream reads) for a stream resumed at `frac` of epoch 0."""
    t0 = time.perf_counter()
    chunks = scan_chunks(shard_files(cfg, "train"))
    done = int(frac * chunks.total_rows)
    stream = TrainStream(cfg, chunks, rank=0, world=1, batch=batch, first_epoch=0, epochs=1,
                         consumed=[(0, done)] if done else [])
    try:
        next(iter(stream.batches(0)))
        return time.perf_counter() - t0, int(sum(hi - lo for _, _, lo, hi in stream.pieces))
    finally:
        stream.close()


def one(shards: str, frac: float, workers: int, batch: int) -> None:
    """One measurement in this process: prints a JSON line {"s", "rows"}."""
    import ray

    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    s, rows = first_batch_s(DataConfig(shards=shards, num_workers=workers), frac, batch)
    emit({"s": s, "rows": rows})
    os._exit(0)  # not ray.shutdown(): see the module docstring


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--at", type=float, nargs="+", default=[0.1, 0.9])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="decode tasks (Ray CPUs)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--one", nargs=2, metavar=("SHARDS", "FRACTION"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        one(args.one[0], float(args.one[1]), args.workers, args.batch_size)

    times: dict[float, list[float]] = {f: [] for f in args.at}
    rows: dict[float, int] = {}
    with tempfile.TemporaryDirectory(prefix="bench-resume-stream-") as tmp:
        print(f"generating {args.images} synthetic images -> shards", flush=True)
        shards = make_shards(tmp, args.images, rows_per_shard=1000, seed=0)
        for _ in range(args.repeats):
            for f in args.at:
                r = run([sys.executable, os.path.abspath(__file__), "--one", shards, str(f), "--workers",
                         str(args.workers), "--batch-size", str(args.batch_size)], what=f"measurement at {f}")
                times[f].append(r["s"])
                rows[f] = r["rows"]
    print(f"\nimages={args.images}  workers={args.workers}  batch={args.batch_size}  repeats={args.repeats}  "
          f"load={os.getloadavg()[0]:.2f}")
    print(f"{'fraction':>8} {'rows read':>9} {'first batch s (median)':>22} {'all':>20}")
    for f in args.at:
        print(f"{f:>8.2f} {rows[f]:>9d} {statistics.median(times[f]):>22.2f} "
              f"{' '.join(f'{t:.2f}' for t in times[f]):>20}")


if __name__ == "__main__":
    main()
