"""The MLflow pyfunc model of a registered version: what `mlflow.pyfunc.load_model(...)` and
`mlflow models serve` run.

    model = mlflow.pyfunc.load_model("models:/codetr-coco@champion")
    out = model.predict(pd.DataFrame({"image": [open("a.jpg", "rb").read()]}))
    out.loc[0, "boxes"]   # [[x1, y1, x2, y2], ...] in source pixels; also scores, labels, category_ids,
                          # category_names, error ("" or why the row's image could not be read)

    mlflow models serve -m models:/codetr-coco@champion --env-manager local -p 5001
    curl -s localhost:5001/invocations -H 'Content-Type: application/json' \
        -d '{"dataframe_split": {"columns": ["image"], "data": [["<base64 of the JPEG>"]]}}'

Input: a DataFrame with a column `image` (encoded JPEG / PNG bytes; base64 strings in JSON requests) or a column
`uri` (a path or storage URI to read). Params: `score_threshold` (float, default 0). A row whose image cannot be
read gets empty detections and its reason in `error`; the other rows are still answered.
The artefact holds the deployed model only (K = 0: aux heads, adapter and aux projections removed) with its
categories and preprocessing (`pipeline.inference.model_io`, deployed directory).
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from pipeline.inference.model_io import LoadedModel

ARTIFACT = "deployed"
OUTPUT_COLUMNS = ["boxes", "scores", "labels", "category_ids", "category_names", "error"]


class CoDETRPyfunc(mlflow.pyfunc.PythonModel):
    """Custom pyfunc: DataFrame of images -> DataFrame of detections, one row per input row."""

    def load_context(self, context: Any) -> None:
        from pipeline.inference.detector import Detector
        from pipeline.inference.model_io import load_deployed

        self.loaded = load_deployed(context.artifacts[ARTIFACT])
        self.detector = Detector(self.loaded)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
                ) -> pd.DataFrame:
        from pipeline.inference.preprocess import BadImage, decode_image_bytes

        threshold = float((params or {}).get("score_threshold", 0.0))
        if "image" not in model_input.columns and "uri" not in model_input.columns:
            raise ValueError(f"input columns {list(model_input.columns)}: expected a column 'image' (encoded "
                             f"bytes) or 'uri'")
        rows: list[dict[str, Any]] = []
        for i in range(len(model_input)):
            try:
                image = decode_image_bytes(*_row_bytes(model_input, i))
            except (BadImage, OSError) as e:
                rows.append(_empty(str(e)))
                continue
            try:
                det = self.detector.predict([image], [i], score_threshold=threshold)[0]
            except ValueError as e:  # e.g. an image too small for the model's query count
                rows.append(_empty(f"row {i}: {e}".splitlines()[0]))
                continue
            rows.append({"boxes": det["boxes"].astype(np.float64).tolist(),
                         "scores": det["scores"].astype(np.float64).tolist(),
                         "labels": det["labels"].tolist(), "category_ids": det["category_ids"].tolist(),
                         "category_names": list(det["category_names"]), "error": ""})
        return pd.DataFrame(rows, columns=OUTPUT_COLUMNS)


def _row_bytes(df: pd.DataFrame, i: int) -> tuple[bytes, str]:
    """(encoded bytes, name for messages) of row i: the `image` cell, else the file named by `uri`."""
    from pipeline import storage

    image = df["image"].iloc[i] if "image" in df.columns else None
    if image is not None and not (isinstance(image, float) and np.isnan(image)):
        if isinstance(image, str):  # JSON clients may send base64 text where the schema has no binary column
            import base64

            image = base64.b64decode(image)
        return bytes(image), f"row {i}"
    uri = df["uri"].iloc[i] if "uri" in df.columns else None
    if not uri:
        return b"", f"row {i}"
    return storage.read_bytes(str(uri)), str(uri)


def _empty(error: str) -> dict[str, Any]:
    return {"boxes": [], "scores": [], "labels": [], "category_ids": [], "category_names": [], "error": error}


def example_image_bytes(height: int = 48, width: int = 64) -> bytes:
    """A small PNG (gradient with a bright rectangle): the logged input example."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), np.full_like(x, 96)], -1)
    rgb[height // 4: height // 2, width // 4: width // 2] = 240
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def signature() -> Any:
    """Input `image` (binary, optional) / `uri` (string, optional); output lists per row; param score_threshold."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("binary", "image", required=False), ColSpec("string", "uri", required=False)])
    outputs = Schema([
        ColSpec(Array(Array("double")), "boxes"), ColSpec(Array("double"), "scores"),
        ColSpec(Array("long"), "labels"), ColSpec(Array("long"), "category_ids"),
        ColSpec(Array("string"), "category_names"), ColSpec("string", "error"),
    ])
    params = ParamSchema([ParamSpec("score_threshold", "double", 0.0)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def log_pyfunc(model: Any, categories: list[dict[str, Any]] | None, preprocess: Any, name: str = "model",
               code_paths: list[str] | None = None, pip_requirements: list[str] | None = None) -> Any:
    """Log the deployed form of `model` as a CoDETRPyfunc under the active run. Returns the ModelInfo."""
    from pipeline.inference.model_io import save_deployed

    with tempfile.TemporaryDirectory(prefix="codetr-deployed-") as tmp:
        directory = save_deployed(os.path.join(tmp, ARTIFACT), model, categories, preprocess)
        return mlflow.pyfunc.log_model(
            name=name, python_model=CoDETRPyfunc(), artifacts={ARTIFACT: directory}, code_paths=code_paths,
            pip_requirements=pip_requirements, signature=signature(),
            input_example=pd.DataFrame({"image": [example_image_bytes()]}),
        )


def load_registered(uri: str, tracking_uri: str | None = None) -> LoadedModel | None:
    """The LoadedModel of a pyfunc-flavoured `models:/` / `runs:/` URI; None if the version is an older
    mlflow.pytorch one (no CoDETRPyfunc inside)."""
    from mlflow.models import get_model_info

    from pipeline.tracking.model_uri import normalize_model_uri

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    uri = normalize_model_uri(uri)
    if "pytorch" in get_model_info(uri).flavors:
        return None
    python_model = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    if not isinstance(python_model, CoDETRPyfunc):
        return None
    python_model.loaded.source = uri
    return python_model.loaded
