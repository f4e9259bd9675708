"""What differs between COCO-format sources (COCO 2017, Objects365 v2, LVIS v1), and per-image box cleaning.

The file itself is read by `stream_source.scan_source` (streaming, never whole in memory).

The three sources differ only at the edges handled here:
- COCO:        `file_name` "000000391895.jpg" relative to the split's image folder; `iscrowd` per box;
               category ids 1..90 with gaps.
- Objects365:  `file_name` "images/v1/patch8/objects365_v1_00420917.jpg", while downloads hold `patch8/...`:
               the path is resolved by trying its suffixes (`image_candidates`).
- LVIS v1:     no `file_name`; the image is named by `coco_url`'s last two parts ("train2017/000000391895.jpg")
               under the COCO image root; no `iscrowd`; categories carry `frequency` (r/c/f); images carry
               `neg_category_ids` and `not_exhaustive_category_ids`.

Category ids are mapped to contiguous labels in ascending id order (label i = i-th smallest id). Box cleaning
(`clean_annotations`) is a pure function applied per image once its real size is known.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

# Every skipped or repaired record has one of these keys; all are reported, zeros included.
ISSUE_KEYS = (
    "missing_image",            # image file not found under --images (image skipped)
    "unreadable_image",         # image file could not be read for another reason (image skipped)
    "corrupt_image",            # bytes do not decode as an image (image skipped)
    "size_mismatch",            # decoded size differs from the JSON's width/height (decoded size kept)
    "duplicate_image",          # image id listed twice (later entries skipped)
    "malformed_image",          # image entry without id or without file_name/coco_url (skipped)
    "orphan_annotation",        # annotation whose image_id is not an image of the file (skipped)
    "malformed_box",            # bbox missing, not 4 numbers, or non-finite (box dropped)
    "nonpositive_box",          # width or height <= 0 (box dropped)
    "clipped_box",              # box partly outside the image (clipped to it)
    "outside_box",              # box entirely outside the image (box dropped)
    "unknown_category",         # category_id not in `categories` (box dropped)
    "unknown_category_in_list",  # unknown id in an LVIS neg/not-exhaustive list (id dropped)
)


@dataclass(frozen=True)
class Category:
    label: int
    id: int
    name: str
    frequency: str | None = None  # LVIS only: "r" | "c" | "f"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"label": self.label, "id": self.id, "name": self.name}
        if self.frequency is not None:
            d["frequency"] = self.frequency
        return d


def file_name_of(image: dict[str, Any]) -> str | None:
    """The image path relative to the image root: `file_name`, else `coco_url`'s last two parts (LVIS)."""
    if image.get("file_name"):
        return str(image["file_name"]).lstrip("/")
    if image.get("coco_url"):
        parts = [p for p in urlparse(str(image["coco_url"])).path.split("/") if p]
        return "/".join(parts[-2:]) if parts else None
    return None


def image_candidates(file_name: str) -> list[str]:
    """Relative paths to try for an image, longest first: "images/v1/patch8/x.jpg" -> [that,
    "v1/patch8/x.jpg", "patch8/x.jpg", "x.jpg"]. Index k = k leading folders dropped."""
    parts = [p for p in file_name.split("/") if p]
    return ["/".join(parts[k:]) for k in range(len(parts))]


def clean_annotations(anns: list[dict[str, Any]], width: int, height: int, label_of: dict[int, int],
                      counts: Counter) -> tuple[list[list[float]], list[int], list[int]]:
    """Validate one image's boxes against its real size. Returns (boxes xywh absolute, labels, iscrowd).

    Drops boxes that are malformed, have width/height <= 0, lie entirely outside the image, or name an unknown
    category; clips boxes that stick out. Every case increments `counts[key]` (keys in ISSUE_KEYS)."""
    boxes: list[list[float]] = []
    labels: list[int] = []
    crowd: list[int] = []
    for a in anns:
        bbox = a.get("bbox")
        if (not isinstance(bbox, list | tuple) or len(bbox) != 4
                or not all(isinstance(v, int | float) and math.isfinite(v) for v in bbox)):
            counts["malformed_box"] += 1
            continue
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            counts["nonpositive_box"] += 1
            continue
        cid = a.get("category_id")
        label = label_of.get(cid) if isinstance(cid, int) else None
        if label is None:
            counts["unknown_category"] += 1
            continue
        x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
        if x2 <= x1 or y2 <= y1:
            counts["outside_box"] += 1
            continue
        if (x1, y1, x2, y2) != (x, y, x + w, y + h):
            counts["clipped_box"] += 1
        boxes.append([x1, y1, x2 - x1, y2 - y1])
        labels.append(label)
        crowd.append(1 if a.get("iscrowd") else 0)
    return boxes, labels, crowd


def map_category_list(ids: list[Any], label_of: dict[int, int], counts: Counter) -> list[int]:
    """LVIS per-image category lists (source ids) -> sorted labels; unknown ids counted and dropped."""
    out = []
    for i in ids:
        if i in label_of:
            out.append(label_of[i])
        else:
            counts["unknown_category_in_list"] += 1
    return sorted(set(out))
