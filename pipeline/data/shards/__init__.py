"""COCO-format sources (COCO 2017, Objects365 v2, LVIS v1) -> Parquet shards + manifest.json.

    from pipeline.data.shards import build_shards, read_manifest
    build_shards(annotations_uri, images_uri, out_uri, split="train", rows_per_shard=1000)
    read_manifest(out_uri).categories   # label order; entry i = label i (with image_count / instance_count)
    category_image_counts(read_manifest(out_uri), "train")   # images per label, e.g. for FedLoss
"""

from pipeline.data.shards.build import build_shards
from pipeline.data.shards.coco_source import ISSUE_KEYS, clean_annotations
from pipeline.data.shards.manifest import Manifest, SplitInfo, category_image_counts, format_summary, read_manifest
from pipeline.data.shards.stream_source import scan_source
from pipeline.data.shards.writer import shard_schema

__all__ = [
    "ISSUE_KEYS", "Manifest", "SplitInfo", "build_shards", "category_image_counts", "clean_annotations",
    "format_summary", "read_manifest", "scan_source", "shard_schema",
]
