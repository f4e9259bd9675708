"""`<shards>/manifest.json`: what a shard set holds and how it was made.

    {
      "format_version": 1,
      "dataset": "synthetic-coco",             # from the source's info.description, or --name
      "source_format": "coco",                 # coco | objects365 | lvis
      "num_classes": 5,
      "categories": [{"label": 0, "id": 1, "name": "red_circle", "image_count": 40, "instance_count": 61}, ...],
                      # label order; LVIS adds "frequency"; the counts are those of the "train" split (else the
                      # largest split) as written, after box cleaning
      "columns": {"image_id": "int64", ...},
      "split_sizes": {"train": 200, "val": 40},                      # images written per split
      "splits": {"train": {"num_images": 200, "num_boxes": 811, "num_empty_images": 12, "num_shards": 1,
                           "rows_per_shard": 1000, "files": ["train/part-00000.parquet"],
                           "source": {"annotations": URI, "images": URI, "sha256": "..."},
                           "counts": {"missing_image": 0, "corrupt_image": 0, ...},
                           "image_counts": [40, ...], "instance_counts": [61, ...]}}   # per label, this split
    }

Splits are built one at a time onto the same root; every split must share the category list.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pipeline import storage

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class SplitInfo:
    num_images: int
    num_boxes: int
    num_empty_images: int
    num_shards: int
    rows_per_shard: int
    files: tuple[str, ...]  # relative to the shard root, e.g. "train/part-00000.parquet"
    source: dict[str, str]  # annotations, images, sha256 (of the annotation file's bytes)
    counts: dict[str, int]  # every skipped / repaired record, zeros included
    image_counts: tuple[int, ...] = ()     # per label: images with at least one box of the label
    instance_counts: tuple[int, ...] = ()  # per label: boxes


@dataclass(frozen=True)
class Manifest:
    dataset: str
    source_format: str
    categories: tuple[dict[str, Any], ...]
    columns: dict[str, str]
    splits: dict[str, SplitInfo] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.categories]

    @property
    def split_sizes(self) -> dict[str, int]:
        return {k: v.num_images for k, v in self.splits.items()}

    def with_split(self, name: str, info: SplitInfo | None) -> Manifest:
        """A copy with split `name` set to `info` (None removes it)."""
        splits = {k: v for k, v in self.splits.items() if k != name}
        if info is not None:
            splits[name] = info
        return dataclasses.replace(self, splits=dict(sorted(splits.items())))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version, "dataset": self.dataset, "source_format": self.source_format,
            "num_classes": self.num_classes, "categories": list(self.categories), "columns": self.columns,
            "split_sizes": self.split_sizes,
            "splits": {k: {**dataclasses.asdict(v), "files": list(v.files), "image_counts": list(v.image_counts),
                           "instance_counts": list(v.instance_counts)} for k, v in self.splits.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"manifest format_version {d.get('format_version')!r} is not {FORMAT_VERSION}")
        splits = {k: SplitInfo(**{**v, "files": tuple(v["files"]), "image_counts": tuple(v.get("image_counts", ())),
                                  "instance_counts": tuple(v.get("instance_counts", ()))})
                  for k, v in d.get("splits", {}).items()}
        return cls(dataset=d["dataset"], source_format=d["source_format"], categories=tuple(d["categories"]),
                   columns=dict(d["columns"]), splits=splits, format_version=d["format_version"])


def count_split(manifest: Manifest) -> str | None:
    """The split whose per-category counts go on `categories`: "train" if built, else the largest split."""
    if "train" in manifest.splits:
        return "train"
    return max(manifest.splits, key=lambda k: (manifest.splits[k].num_images, k), default=None)


def with_category_counts(manifest: Manifest) -> Manifest:
    """A copy whose `categories` entries carry `image_count` / `instance_count` of `count_split` (none if no
    split has counts)."""
    split = count_split(manifest)
    info = manifest.splits.get(split) if split else None
    cats = []
    for c in manifest.categories:
        c = {k: v for k, v in c.items() if k not in ("image_count", "instance_count")}
        if info is not None and info.image_counts:
            c.update(image_count=int(info.image_counts[c["label"]]),
                     instance_count=int(info.instance_counts[c["label"]]))
        cats.append(c)
    return dataclasses.replace(manifest, categories=tuple(cats))


def category_image_counts(manifest: Manifest, split: str = "train") -> list[int]:
    """Images per category of `split`, in label order (entry i = label i), e.g. for LVIS FedLoss weights.
    Raises ValueError (one line) when the split is absent or was built without per-category counts."""
    info = manifest.splits.get(split)
    if info is None:
        raise ValueError(f"split {split!r} is not in the manifest (splits: {sorted(manifest.splits)})")
    if len(info.image_counts) != manifest.num_classes:
        raise ValueError(f"split {split!r} has no per-category counts (built before they were recorded); "
                         "rebuild it with jobs/build_shards.py")
    return list(info.image_counts)


def manifest_uri(shards_uri: str) -> str:
    return storage.join(shards_uri, MANIFEST_NAME)


def read_manifest(shards_uri: str) -> Manifest:
    """The manifest of the shard set at `shards_uri`; FileNotFoundError (one line) if there is none."""
    uri = manifest_uri(shards_uri)
    if not storage.exists(uri):
        raise FileNotFoundError(f"no shard manifest at {uri!r}; build shards with jobs/build_shards.py first")
    return Manifest.from_dict(storage.read_json(uri))


def write_manifest(shards_uri: str, manifest: Manifest) -> None:
    storage.write_json(manifest_uri(shards_uri), manifest.to_dict())


def format_summary(manifest: Manifest, split: str) -> str:
    """Human-readable summary of one split: sizes, then every issue count (non-zero ones marked)."""
    info = manifest.splits[split]
    lines = [f"shards {manifest.dataset!r} split {split!r}: {info.num_images} images, {info.num_boxes} boxes, "
             f"{info.num_empty_images} images without boxes, {manifest.num_classes} classes, "
             f"{info.num_shards} shard file(s)",
             "skipped / repaired records:"]
    for key, n in info.counts.items():
        lines.append(f"  {key:<26} {n:>8}" + ("  <-" if n else ""))
    return "\n".join(lines)
