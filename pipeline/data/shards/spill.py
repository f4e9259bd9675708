"""Spill files: the annotation source as compact columns on storage, joined by image id inside the shard tasks.

The streaming parser (`stream_source.py`) appends one image or one box at a time to a `ColumnSpill`; every
`chunk_rows` rows the buffers (array.array, 8 bytes a number; no dict per box) are sorted by image id and
written as `<prefix>-NNNNN.parquet` with small row groups, so a shard task reading the image-id range
[lo, hi) of every chunk reads only the row groups whose min/max statistics overlap it.

Columns (both kinds carry `seq`, the entry's position in the source file, to keep the source order of boxes
and to keep the first of duplicated image ids):
    images: seq int64, image_id int64, file_name string, width int32, height int32,
            neg_category_ids list<int64>, not_exhaustive_category_ids list<int64> (source ids, LVIS)
    boxes:  seq int64, image_id int64, category_id int64 (null: not an integer), x y w h float64 (null: bbox
            malformed), iscrowd int8
"""

from __future__ import annotations

import io
from array import array
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage

ROW_GROUP = 4096
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class ColumnSpill:
    """Append-only column buffers flushed to sorted Parquet chunks under `prefix`-NNNNN.parquet.

    kind: "images" or "boxes" (the column sets above)."""

    def __init__(self, prefix: str, kind: str, chunk_rows: int):
        if kind not in ("images", "boxes"):
            raise ValueError(f"spill kind must be 'images' or 'boxes', got {kind!r}")
        self.prefix, self.kind, self.chunk_rows = prefix, kind, chunk_rows
        self.uris: list[str] = []
        self.rows = 0
        self._reset()

    def _reset(self) -> None:
        self.seq, self.image_id = array("q"), array("q")
        if self.kind == "images":
            self.file_name: list[str] = []
            self.width, self.height = array("i"), array("i")
            self.neg: list[list[int]] = []
            self.nex: list[list[int]] = []
        else:
            self.category_id, self.cat_ok = array("q"), array("b")
            self.bbox, self.bbox_ok = array("d"), array("b")
            self.iscrowd = array("b")

    def add_image(self, seq: int, image_id: int, file_name: str, width: int, height: int,
                  neg: list[int], nex: list[int]) -> None:
        self.seq.append(seq)
        self.image_id.append(image_id)
        self.file_name.append(file_name)
        self.width.append(width)
        self.height.append(height)
        self.neg.append(neg)
        self.nex.append(nex)
        self._maybe_flush()

    def add_box(self, seq: int, image_id: int, category_id: int | None, bbox: tuple[float, ...] | None,
                iscrowd: int) -> None:
        self.seq.append(seq)
        self.image_id.append(image_id)
        self.category_id.append(category_id if category_id is not None else 0)
        self.cat_ok.append(category_id is not None)
        self.bbox.extend(bbox if bbox is not None else (0.0, 0.0, 0.0, 0.0))
        self.bbox_ok.append(bbox is not None)
        self.iscrowd.append(iscrowd)
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        if len(self.seq) >= self.chunk_rows:
            self.flush()

    def _table(self) -> pa.Table:
        cols: dict[str, Any] = {"seq": np.frombuffer(self.seq, np.int64),
                                "image_id": np.frombuffer(self.image_id, np.int64)}
        if self.kind == "images":
            cols.update(file_name=pa.array(self.file_name, pa.string()),
                        width=np.frombuffer(self.width, np.int32), height=np.frombuffer(self.height, np.int32),
                        neg_category_ids=pa.array(self.neg, pa.list_(pa.int64())),
                        not_exhaustive_category_ids=pa.array(self.nex, pa.list_(pa.int64())))
        else:
            bad_cat = np.frombuffer(self.cat_ok, np.int8) == 0
            bad_box = np.frombuffer(self.bbox_ok, np.int8) == 0
            xywh = np.frombuffer(self.bbox, np.float64).reshape(-1, 4)  # (N, 4)
            cols["category_id"] = pa.array(np.frombuffer(self.category_id, np.int64), mask=bad_cat)
            for k, name in enumerate("xywh"):
                cols[name] = pa.array(np.ascontiguousarray(xywh[:, k]), mask=bad_box)
            cols["iscrowd"] = np.frombuffer(self.iscrowd, np.int8)
        return pa.table(cols)

    def flush(self) -> None:
        """Write the buffered rows (sorted by image id, then source order) as the next chunk."""
        if not len(self.seq):
            return
        table = self._table()
        table = table.take(np.argsort(np.frombuffer(self.image_id, np.int64), kind="stable"))
        uri = f"{self.prefix}-{len(self.uris):05d}.parquet"
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=ROW_GROUP, compression="zstd")
        storage.write_bytes(uri, buf.getvalue())
        self.uris.append(uri)
        self.rows += table.num_rows
        self._reset()


def read_range(uris: list[str], lo: int | None, hi: int | None) -> pa.Table | None:
    """Rows of the spill chunks `uris` with lo <= image_id < hi (None: unbounded), sorted by (image_id, seq).
    Only the row groups whose statistics overlap the range are read. None when `uris` is empty."""
    if not uris:
        return None
    lo_v = _INT64_MIN if lo is None else int(lo)
    hi_v = _INT64_MAX if hi is None else int(hi)
    parts = []
    schema = None
    for uri in uris:
        fs, path = storage.get_fs(uri)
        with fs.open(path, "rb") as fh:
            f = pq.ParquetFile(fh)
            schema = f.schema_arrow
            col = f.schema_arrow.get_field_index("image_id")
            groups = []
            for g in range(f.metadata.num_row_groups):
                st = f.metadata.row_group(g).column(col).statistics
                if st is None or not st.has_min_max or (st.max >= lo_v and st.min < hi_v):
                    groups.append(g)
            if groups:
                t = f.read_row_groups(groups)
                ids = t["image_id"]
                parts.append(t.filter(pc.and_(pc.greater_equal(ids, lo_v), pc.less(ids, hi_v))))
    if not parts:
        return schema.empty_table()
    return pa.concat_tables(parts).sort_by([("image_id", "ascending"), ("seq", "ascending")])
