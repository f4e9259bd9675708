"""Reading a COCO-format annotation file (COCO 2017, Objects365 v2, LVIS v1) into per-image records.

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

import hashlib
import json
import math
import posixpath
from collections import Counter
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from pipeline import storage

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


@dataclass(frozen=True)
class CocoSource:
    """One parsed annotation file. `records` are sorted by image id, each a JSON-able dict:
    image_id, file_name (path relative to the image root, as the source names it), width, height (from the JSON,
    0 if absent), anns [{bbox, category_id, iscrowd}], and for LVIS neg_category_ids /
    not_exhaustive_category_ids (source ids)."""

    name: str
    source_format: str  # "coco" | "objects365" | "lvis"
    sha256: str
    categories: tuple[Category, ...]
    records: list[dict[str, Any]]
    counts: Counter

    @property
    def is_lvis(self) -> bool:
        return self.source_format == "lvis"

    def label_of(self) -> dict[int, int]:
        return {c.id: c.label for c in self.categories}


def _file_name(image: dict[str, Any]) -> str | None:
    if image.get("file_name"):
        return str(image["file_name"]).lstrip("/")
    if image.get("coco_url"):
        parts = [p for p in urlparse(str(image["coco_url"])).path.split("/") if p]
        return "/".join(parts[-2:]) if parts else None
    return None


def load_coco_source(annotations_uri: str) -> CocoSource:
    """Parse `annotations_uri` (any storage URI). Raises FileNotFoundError / ValueError with one-line messages
    for a missing file or a file that is not COCO-format; record-level problems are counted, not raised."""
    raw = storage.read_bytes(annotations_uri)
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"annotations {annotations_uri!r} are not valid JSON: {e}") from e
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(doc, dict)
               or not isinstance(doc.get(k), list)]
    if missing:
        raise ValueError(f"annotations {annotations_uri!r} are not COCO-format: missing list(s) {missing}")

    cat_ids = [c.get("id") for c in doc["categories"] if isinstance(c, dict)]
    if len(cat_ids) != len(doc["categories"]) or not all(isinstance(i, int) for i in cat_ids):
        raise ValueError(f"annotations {annotations_uri!r}: every category needs an integer 'id'")
    if len(set(cat_ids)) != len(cat_ids):
        dup = sorted(i for i, n in Counter(cat_ids).items() if n > 1)
        raise ValueError(f"annotations {annotations_uri!r}: duplicate category ids {dup[:10]}")
    if not cat_ids:
        raise ValueError(f"annotations {annotations_uri!r}: 'categories' is empty")
    cats = sorted(doc["categories"], key=lambda c: c["id"])
    categories = tuple(Category(label=i, id=int(c["id"]), name=str(c.get("name", c["id"])),
                                frequency=c.get("frequency")) for i, c in enumerate(cats))

    images = doc["images"]
    is_lvis = any(c.frequency for c in categories) or any(
        isinstance(im, dict) and "file_name" not in im and "coco_url" in im for im in images[:100])
    names = [im.get("file_name", "") for im in images[:100] if isinstance(im, dict)]
    is_o365 = any("/patch" in str(n) or str(n).startswith("patch") for n in names)
    source_format = "lvis" if is_lvis else "objects365" if is_o365 else "coco"

    counts: Counter = Counter({k: 0 for k in ISSUE_KEYS})
    by_id: dict[int, dict[str, Any]] = {}
    for im in images:
        fname = _file_name(im) if isinstance(im, dict) else None
        if not isinstance(im, dict) or not isinstance(im.get("id"), int) or not fname:
            counts["malformed_image"] += 1
            continue
        if im["id"] in by_id:
            counts["duplicate_image"] += 1
            continue
        rec: dict[str, Any] = {"image_id": im["id"], "file_name": fname, "width": int(im.get("width") or 0),
                               "height": int(im.get("height") or 0), "anns": []}
        if is_lvis:
            rec["neg_category_ids"] = list(im.get("neg_category_ids") or [])
            rec["not_exhaustive_category_ids"] = list(im.get("not_exhaustive_category_ids") or [])
        by_id[im["id"]] = rec
    for a in doc["annotations"]:
        rec = by_id.get(a.get("image_id")) if isinstance(a, dict) else None
        if rec is None:
            counts["orphan_annotation"] += 1
            continue
        rec["anns"].append({"bbox": a.get("bbox"), "category_id": a.get("category_id"),
                            "iscrowd": int(a.get("iscrowd") or 0)})
    info = doc.get("info") if isinstance(doc.get("info"), dict) else {}
    name = str(info.get("description") or posixpath.basename(annotations_uri.rstrip("/")).rsplit(".", 1)[0])
    return CocoSource(name=name, source_format=source_format, sha256=hashlib.sha256(raw).hexdigest(),
                      categories=categories, records=[by_id[i] for i in sorted(by_id)], counts=counts)


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
