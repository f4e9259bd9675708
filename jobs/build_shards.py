"""Convert a COCO-format source (COCO 2017, Objects365 v2, LVIS v1) into Parquet shards + manifest.json.

    python jobs/build_shards.py --annotations /tmp/synth/annotations/instances_train.json \
        --images /tmp/synth/images/train --out /tmp/shards --split train
    ray job submit --working-dir . -- python jobs/build_shards.py \
        --annotations s3://raw/coco/annotations/instances_train2017.json --images s3://raw/coco/train2017 \
        --out s3://shards/coco --split train --rows-per-shard 1000
    # LVIS v1: images are found by coco_url under the COCO root (train2017/..., val2017/...)
    ray job submit --working-dir . -- python jobs/build_shards.py \
        --annotations s3://raw/lvis/lvis_v1_val.json --images s3://raw/coco --out s3://shards/lvis --split val

Runs on the Ray cluster it is submitted to (or a local Ray instance), one Ray task per shard; the annotation
file is streamed (never whole in memory) and the driver keeps only the sorted image ids. Shows progress
(images, images/s, ETA), then every skipped or repaired record count (also stored in the manifest) and a
summary (images/s, bytes written). Re-running onto the same --out resumes (default): shards an interrupted or
earlier run finished are verified (row count, sha256) and kept; it never duplicates rows. --rebuild starts
the split from scratch. --split defaults to the <split> in "instances_<split>.json" (else "train").
"""

from __future__ import annotations

import argparse
import posixpath
import re
import sys

import _bootstrap  # noqa: F401  (must come before `pipeline`: makes `pipeline` the package, see jobs/_bootstrap.py)

from pipeline.data.shards import build_shards


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--annotations", required=True, help="URI of the COCO-format instances JSON")
    p.add_argument("--images", required=True, help="URI of the image root the JSON's file names are relative to")
    p.add_argument("--out", required=True, help="URI of the shard root (manifest.json, <split>/part-*.parquet)")
    p.add_argument("--split", default=None, help="split name (default: from instances_<split>.json, else train)")
    p.add_argument("--rows-per-shard", type=int, default=1000, help="images per Parquet file (default 1000)")
    p.add_argument("--name", default=None, help="dataset name in the manifest (default: the JSON's description)")
    p.add_argument("--serial", action="store_true", help="convert in this process, without Ray (debugging)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", dest="resume", action="store_true", default=True,
                      help="keep shards an earlier run of the same build finished (default)")
    mode.add_argument("--rebuild", dest="resume", action="store_false",
                      help="delete the split's shards and build records first, then build from scratch")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    split = args.split
    if split is None:
        m = re.fullmatch(r"instances_(.+)\.json", posixpath.basename(args.annotations))
        split = m.group(1) if m else "train"
    try:
        manifest = build_shards(args.annotations, args.images, args.out, split=split,
                                rows_per_shard=args.rows_per_shard, name=args.name, parallel=not args.serial,
                                resume=args.resume)
    except (ValueError, OSError) as e:  # FileNotFoundError is an OSError
        print(f"build_shards: error: {e}", file=sys.stderr)
        return 2
    info = manifest.splits[split]
    print(f"shards: {args.out} split={split} images={info.num_images} files={info.num_shards} "
          f"classes={manifest.num_classes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
