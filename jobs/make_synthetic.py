"""Generate a synthetic COCO-format detection dataset (instances JSON + encoded images) at any storage URI.

    python jobs/make_synthetic.py --out /tmp/synth --images 200 --classes 5 --seed 0
    python jobs/make_synthetic.py --out s3://bucket/synth-o365 --images 2000 --classes 365 --style o365
    ray job submit --working-dir . -- python jobs/make_synthetic.py --out s3://bucket/synth --images 1000

Writes <out>/annotations/instances_<split>.json and <out>/images/<split>/... for each of --splits; --images
counts the first split, --val-images every other one (default: max(2, images // 5)). Same arguments, same
bytes. Prints, per split, the --annotations / --images arguments for jobs/build_shards.py.
"""

from __future__ import annotations

import argparse
import sys
import time

import _bootstrap  # noqa: F401  (must come before `pipeline`: makes `pipeline` the package, see jobs/_bootstrap.py)

from pipeline import storage
from pipeline.data.synthetic import STYLES, SyntheticConfig, generate_dataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output root URI (local path, file://, s3://...)")
    p.add_argument("--images", type=int, default=200, help="images in the first split (default 200)")
    p.add_argument("--val-images", type=int, default=None, help="images in every other split")
    p.add_argument("--classes", type=int, default=5, help="number of classes (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--style", choices=STYLES, default="coco", help="source layout to mimic (default coco)")
    p.add_argument("--image-size", type=int, nargs="+", default=[160, 320], metavar="PX",
                   help="MIN [MAX] pixels per image side (default 160 320)")
    p.add_argument("--splits", default="train,val", help="comma-separated split names (default train,val)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if len(args.image_size) > 2:
            raise ValueError(f"--image-size takes MIN [MAX], got {args.image_size}")
        lo, hi = args.image_size[0], args.image_size[-1]
        cfg = SyntheticConfig(images=args.images, val_images=args.val_images, classes=args.classes, seed=args.seed,
                              style=args.style, image_size=(lo, hi),
                              splits=tuple(s.strip() for s in args.splits.split(",") if s.strip()))
        storage.check_reachable(args.out)
        t0 = time.time()
        ds = generate_dataset(args.out, cfg, progress=lambda s, i, n: print(
            f"\r{s}: {i}/{n} images", end="\n" if i == n else "", flush=True, file=sys.stderr))
    except (ValueError, OSError) as e:
        print(f"make_synthetic: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote synthetic-{cfg.style} ({cfg.classes} classes, seed {cfg.seed}) to {args.out} "
          f"in {time.time() - t0:.1f}s")
    for split, paths in ds.splits.items():
        print(f"  {split}: --annotations {paths.annotations} --images {paths.images}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
