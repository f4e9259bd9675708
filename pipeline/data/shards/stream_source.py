"""Streaming scan of a COCO-format annotation file (COCO 2017, Objects365 v2, LVIS v1; local or any storage URI)
into spill files plus a small per-image index; the file is never held in memory.

    index = scan_source("s3://raw/o365/zhiyuan_objv2_train.json", "s3://shards/o365/_build/train/spill")
    index.image_ids          # (N,) int64 sorted unique image ids: the only per-image state on the driver

Parser: ijson with its C backend (yajl2_c). On a 40 MB Objects365-like file (2-core box, loaded): yajl2_c
`items("annotations.item")` 1.8 s, stdlib `json.load` 2.5 s (and ~6x the file size in RSS), yajl2_c raw `parse`
events 3.7 s, the pure-Python backend ~54 s (30x slower). With the C backend the cost is the event stream itself
(an `items` coroutine costs about as much for a prefix that matches nothing), so the file is read once, in
`PARSE_BLOCK` pieces, into two streams: `items("annotations.item")` (the bulk, built in C) and `parse` events,
from which the rest (each image entry, categories, info, which top-level keys hold lists) is built in Python
by ijson's own `items` coroutine; annotation events are skipped by one comparison each. Memory: the objects
of one piece, O(1) in the file size. The sha256 is taken over the same reads.

Record-level problems are counted here where they are visible (malformed_image, duplicate_image, and
orphan_annotation for an entry that is not an object or has no integer image_id); those that need the join
(orphan annotations of unknown images, box problems) are counted by the shard tasks.
"""

from __future__ import annotations

import hashlib
import math
import posixpath
import sys
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ijson
import numpy as np
from ijson.common import items_basecoro
from ijson.utils import sendable_list

from pipeline import storage
from pipeline.data.shards.coco_source import ISSUE_KEYS, Category, file_name_of
from pipeline.data.shards.spill import ColumnSpill

READ_BLOCK = 1 << 20  # bytes per storage read (s3fs block)
PARSE_BLOCK = 1 << 16  # bytes per parser feed: yajl2_c materialises every event of a feed before yielding,
                       # so a 1 MiB feed peaks at ~19 MB of Python objects, 64 KiB at ~1 MB
IMAGE_CHUNK_ROWS = 200_000
BOX_CHUNK_ROWS = 500_000  # ~30 MB of buffers; peak ~3x at a flush (arrow copy + sort)
_BACKEND = ijson.get_backend("yajl2_c") if "yajl2_c" in ijson.backend else ijson  # ijson picks the fastest


@dataclass(frozen=True)
class SourceIndex:
    """The scanned source: metadata, driver-side counts, spill files and the sorted unique image ids."""

    name: str
    source_format: str  # "coco" | "objects365" | "lvis"
    sha256: str
    categories: tuple[Category, ...]
    image_ids: np.ndarray  # (N,) int64, sorted unique ids of well-formed image entries
    image_spill: tuple[str, ...]
    box_spill: tuple[str, ...]
    num_boxes_in_source: int
    counts: Counter

    @property
    def is_lvis(self) -> bool:
        return self.source_format == "lvis"

    def label_of(self) -> dict[int, int]:
        return {c.id: c.label for c in self.categories}


@dataclass
class _Top:
    """What the scan keeps of the top level besides images and annotations."""

    kinds: dict[str, str]  # top-level key -> event that opens its value ("start_array" for a list)
    categories: list[Any]  # the first "categories" value
    info: dict[str, Any]  # the first "info" value, {} if it is not an object
    sha256: str


def _stream(uri: str, top: list[_Top]) -> Iterator[tuple[list[Any], list[Any]]]:
    """Read `uri` once; yield (image entries, annotation entries) parsed from each piece, in file order. When
    the file is exhausted, appends its `_Top` to `top`. Raises ValueError (one line) for invalid JSON."""
    fs, path = storage.get_fs(uri)
    events, anns = sendable_list(), sendable_list()
    parsers = [_BACKEND.parse_coro(events, use_float=True),
               _BACKEND.items_coro(anns, "annotations.item", use_float=True)]
    images, cats, infos = sendable_list(), sendable_list(), sendable_list()
    builders = {"images": items_basecoro(images, "images.item"), "categories": items_basecoro(cats, "categories"),
                "info": items_basecoro(infos, "info")}
    kinds: dict[str, str] = {}
    sha = hashlib.sha256()
    current, builder = "", None
    with fs.open(path, "rb", block_size=READ_BLOCK) as f:
        while True:
            piece = f.read(PARSE_BLOCK)
            sha.update(piece)
            try:
                for p in parsers:
                    p.send(piece) if piece else p.close()  # close: end of input (raises if incomplete)
            except ijson.JSONError as e:
                raise ValueError(f"annotations {uri!r} are not valid JSON: {e}") from e
            for prefix, event, value in events:
                if prefix == "":
                    if event == "map_key":
                        current, builder = value, builders.get(value)
                    continue
                if prefix == current and current not in kinds:
                    kinds[current] = event
                if builder is not None:
                    builder.send((prefix, event, value))
            events.clear()
            yield images, anns
            images.clear()
            anns.clear()
            if not piece:
                break
    info = infos[0] if infos else {}
    top.append(_Top(kinds, cats[0] if cats else [], info if isinstance(info, dict) else {}, sha.hexdigest()))


def _bbox(b: Any) -> list[float] | None:
    """`b` if it is a list of 4 finite numbers (bools count, as ints), else None."""
    if not isinstance(b, list) or len(b) != 4:
        return None
    try:
        return b if all(map(math.isfinite, b)) else None
    except (TypeError, OverflowError):  # not a number / an int beyond float range
        return None


def _int_list(v: Any) -> list[int]:
    return [int(i) for i in (v or []) if isinstance(i, int)]


def _categories(uri: str, raw: list[Any]) -> tuple[Category, ...]:
    cat_ids = [c.get("id") for c in raw if isinstance(c, dict)]
    if len(cat_ids) != len(raw) or not all(isinstance(i, int) for i in cat_ids):
        raise ValueError(f"annotations {uri!r}: every category needs an integer 'id'")
    if len(set(cat_ids)) != len(cat_ids):
        dup = sorted(i for i, n in Counter(cat_ids).items() if n > 1)
        raise ValueError(f"annotations {uri!r}: duplicate category ids {dup[:10]}")
    if not cat_ids:
        raise ValueError(f"annotations {uri!r}: 'categories' is empty")
    cats = sorted(raw, key=lambda c: c["id"])
    return tuple(Category(label=i, id=int(c["id"]), name=str(c.get("name", c["id"])),
                          frequency=c.get("frequency")) for i, c in enumerate(cats))


def scan_source(annotations_uri: str, spill_prefix: str, verbose: bool = False) -> SourceIndex:
    """Stream `annotations_uri` into spill files `<spill_prefix>/{images,boxes}-NNNNN.parquet`.
    Raises ValueError (one line) for invalid JSON or a file that is not COCO-format."""
    if "yajl2_c" not in _BACKEND.backend and verbose:
        print(f"[shards] ijson C backend unavailable ({ijson.backend}): parsing will be ~30x slower",
              file=sys.stderr)
    counts: Counter = Counter({k: 0 for k in ISSUE_KEYS})
    images = ColumnSpill(storage.join(spill_prefix, "images"), "images", IMAGE_CHUNK_ROWS)
    boxes = ColumnSpill(storage.join(spill_prefix, "boxes"), "boxes", BOX_CHUNK_ROWS)
    ids = array("q")
    head_names: list[str] = []
    coco_url_only = False
    top: list[_Top] = []
    image_seq = box_seq = 0
    for image_batch, ann_batch in _stream(annotations_uri, top):
        for im in image_batch:
            fname = file_name_of(im) if isinstance(im, dict) else None
            if image_seq < 100 and isinstance(im, dict):
                head_names.append(str(im.get("file_name", "")))
                coco_url_only |= "file_name" not in im and "coco_url" in im
            if not isinstance(im, dict) or not isinstance(im.get("id"), int) or not fname:
                counts["malformed_image"] += 1
            else:
                try:
                    w, h = int(im.get("width") or 0), int(im.get("height") or 0)
                except (TypeError, ValueError):
                    w = h = 0
                images.add_image(image_seq, im["id"], fname, w, h, _int_list(im.get("neg_category_ids")),
                                 _int_list(im.get("not_exhaustive_category_ids")))
                ids.append(im["id"])
            image_seq += 1
        for a in ann_batch:
            if not isinstance(a, dict) or not isinstance(a.get("image_id"), int):
                counts["orphan_annotation"] += 1
            else:
                cid = a.get("category_id")
                boxes.add_box(box_seq, a["image_id"], cid if isinstance(cid, int) else None, _bbox(a.get("bbox")),
                              1 if a.get("iscrowd") else 0)
            box_seq += 1
    images.flush()
    boxes.flush()
    kinds, raw_cats, info, sha256 = top[0].kinds, top[0].categories, top[0].info, top[0].sha256
    missing = [k for k in ("images", "annotations", "categories") if kinds.get(k) != "start_array"]
    if missing:
        raise ValueError(f"annotations {annotations_uri!r} are not COCO-format: missing list(s) {missing}")
    categories = _categories(annotations_uri, raw_cats)
    image_ids = np.unique(np.frombuffer(ids, np.int64))
    counts["duplicate_image"] += len(ids) - len(image_ids)
    del ids

    is_lvis = any(c.frequency for c in categories) or coco_url_only
    is_o365 = any("/patch" in n or n.startswith("patch") for n in head_names)
    name = str(info.get("description") or posixpath.basename(annotations_uri.rstrip("/")).rsplit(".", 1)[0])
    return SourceIndex(name=name, source_format="lvis" if is_lvis else "objects365" if is_o365 else "coco",
                       sha256=sha256, categories=categories, image_ids=image_ids,
                       image_spill=tuple(images.uris), box_spill=tuple(boxes.uris),
                       num_boxes_in_source=boxes.rows, counts=counts)
