"""Batch-inference outputs: COCO-format detections JSON, a Parquet table (one row per image), the skipped inputs.

    <out>/detections.json    COCO results: [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]
    <out>/predictions.parquet image_id, path, width, height, boxes (K x [x1, y1, x2, y2] source pixels), scores,
                             labels, category_ids, category_names
    <out>/skipped.json       [{"image_id", "path", "error"}, ...]: inputs that could not be read or decoded
    <out>/summary.json       counts, seconds, images/s, model URI
"""

from __future__ import annotations

import io
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage

PREDICTION_SCHEMA = pa.schema([
    ("image_id", pa.int64()), ("path", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("boxes", pa.list_(pa.list_(pa.float32(), 4))), ("scores", pa.list_(pa.float32())),
    ("labels", pa.list_(pa.int64())), ("category_ids", pa.list_(pa.int64())),
    ("category_names", pa.list_(pa.string())),
])


def coco_results(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Prediction rows -> COCO result dicts (xywh boxes, source category ids)."""
    out = []
    for r in rows:
        for box, score, cat in zip(r["boxes"], r["scores"], r["category_ids"]):
            x1, y1, x2, y2 = (float(v) for v in box)
            out.append({"image_id": int(r["image_id"]), "category_id": int(cat), "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "score": float(score)})
    return out


def write_outputs(out: str, rows: list[dict[str, Any]], skipped: list[dict[str, Any]], summary: dict[str, Any]
                  ) -> dict[str, str]:
    """Write the four outputs under the storage URI `out`. Returns {name: uri}."""
    storage.makedirs(out)
    rows = sorted(rows, key=lambda r: r["image_id"])
    uris = {name: storage.join(out, name) for name in
            ("detections.json", "predictions.parquet", "skipped.json", "summary.json")}
    storage.write_json(uris["detections.json"], coco_results(rows), indent=None)
    table = pa.Table.from_pylist([{k: r[k] for k in PREDICTION_SCHEMA.names} for r in rows], schema=PREDICTION_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uris["predictions.parquet"], buf.getvalue())
    storage.write_json(uris["skipped.json"], sorted(skipped, key=lambda r: r["image_id"]))
    storage.write_json(uris["summary.json"], summary)
    return uris
