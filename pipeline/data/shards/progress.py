"""Conversion progress: images done, images/s and ETA (tqdm), and the one-line final summary.

tqdm redraws in place on a terminal and prints a line every `mininterval` seconds into a log (`ray job logs`).
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class BuildProgress:
    """Counts source images as their shards finish (reused shards included, so the ETA covers the rest)."""

    def __init__(self, total_images: int, split: str, enabled: bool = True):
        self.t0 = time.perf_counter()
        self.images = self.rows = self.bytes_written = self.reused = self.shards = 0
        self.bar = tqdm(total=total_images, unit="img", desc=f"shards {split}", disable=not enabled,
                        file=sys.stderr, mininterval=1.0 if sys.stderr.isatty() else 30.0, smoothing=0.1)

    def update(self, num_images: int, summary: dict) -> None:
        self.images += num_images
        self.rows += int(summary["rows"])
        self.bytes_written += int(summary["bytes_written"])
        self.reused += bool(summary["reused"])
        self.shards += 1
        self.bar.update(num_images)

    def close(self) -> str:
        """Close the bar; returns the summary line (images/s over this run, bytes written, shards reused)."""
        self.bar.close()
        wall = time.perf_counter() - self.t0
        return (f"converted {self.images} source images ({self.rows} rows) in {wall:.1f} s: "
                f"{self.images / max(wall, 1e-9):.0f} images/s, {self.bytes_written / 2**20:.1f} MiB written, "
                f"{self.reused} of {self.shards} shard(s) reused from an earlier run")
