"""The MLflow pyfunc logged with every registered version, against a real `mlflow server` on loopback:
`mlflow.pyfunc.load_model("models:/...@champion").predict(df)` and `mlflow models serve` answering /invocations
give the same detections as the in-memory deployed model; bad rows are answered with an error, not a failure."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.config import dump_yaml, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = ["model.num_classes=3", "data.eval_size=[96,128]", "data.augment.policy=detr"]
CATEGORIES = [{"id": 11, "name": "cat"}, {"id": 22, "name": "dog"}, {"id": 33, "name": "bird"}]


def _png(seed: int, h: int, w: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def registered(mlflow_server):
    """A tiny K=2 Co-DINO registered through the project's own registration code on the server."""
    from pipeline.models import build_model
    from pipeline.tracking import mlflow_tracking as mt

    job = load_config(os.path.join(REPO, "configs/model/co_dino_tiny.yaml"), TINY_MODEL)
    torch.manual_seed(0)
    model = build_model(job.model).eval()
    model.categories = CATEGORIES
    run_id = mt.get_or_create_run(mlflow_server, "pyfunc-test", "pyfunc-run")
    mt.log_text(mlflow_server, run_id, dump_yaml(job), "config.yaml")  # the preprocessing comes from here
    version, champion = mt.log_and_register_model(mlflow_server, run_id, model, "codetr-pyfunc", 0.5)
    assert champion
    return {"model": model, "job": job, "uri": mlflow_server, "version": version}


def _in_memory(model, job, images: list[bytes]) -> list[dict]:
    from pipeline.inference import Detector, LoadedModel, PreprocessConfig
    from pipeline.inference.model_io import deployed_model
    from pipeline.inference.preprocess import decode_image_bytes

    det = Detector(LoadedModel(deployed_model(model), CATEGORIES, PreprocessConfig.from_data(job.data)))
    return [det.predict([decode_image_bytes(b)], [i])[0] for i, b in enumerate(images)]


def test_pyfunc_load_model_predict_equals_in_memory(registered):
    import mlflow

    from pipeline.serving.pyfunc import CoDETRPyfunc

    mlflow.set_tracking_uri(registered["uri"])
    pyfunc = mlflow.pyfunc.load_model("models:/codetr-pyfunc@champion")
    assert pyfunc.metadata.signature is not None and "image" in pyfunc.metadata.signature.inputs.input_names()
    python_model = pyfunc.unwrap_python_model()
    assert isinstance(python_model, CoDETRPyfunc)
    deployed = python_model.loaded.model
    assert len(deployed.aux_heads) == 0 and deployed.adapter is None  # K = 0 weights only
    assert set(deployed.state_dict()) == set(registered["model"].inference_state_dict())
    assert python_model.loaded.preprocess.eval_size == (96, 128)  # from the run's config.yaml

    images = [_png(1, 50, 70), _png(2, 90, 60)]
    df = pd.DataFrame({"image": [images[0], b"not an image", images[1], _png(9, 8, 200)]})
    out = pyfunc.predict(df)
    assert "cannot select" in out.loc[3, "error"]  # 8x200 px -> 5x128: fewer encoder tokens than queries: a row error
    assert list(out.columns) == ["boxes", "scores", "labels", "category_ids", "category_names", "error"]
    assert out.loc[1, "error"].startswith("row 1: cannot decode") and len(out.loc[1, "boxes"]) == 0
    want = _in_memory(registered["model"], registered["job"], images)
    for row, w in zip([0, 2], want):
        assert out.loc[row, "error"] == "" and len(out.loc[row, "scores"]) == len(w["scores"]) > 0
        np.testing.assert_allclose(np.asarray(out.loc[row, "boxes"]), w["boxes"], atol=1e-4)
        np.testing.assert_allclose(np.asarray(out.loc[row, "scores"]), w["scores"], atol=1e-6)
        assert list(out.loc[row, "category_names"]) == w["category_names"]
        assert set(out.loc[row, "category_names"]) <= {"cat", "dog", "bird"}
    # boxes are in source pixels of each image
    assert np.asarray(out.loc[2, "boxes"])[:, [0, 2]].max() <= 60 + 1e-3  # 90 x 60 source image
    assert np.asarray(out.loc[2, "boxes"])[:, [1, 3]].max() <= 90 + 1e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_models_serve_answers_invocations(registered, tmp_path):
    port = _free_port()
    bin_dir = os.path.dirname(sys.executable)  # `mlflow models serve` execs uvicorn from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["uri"],
           "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    exe = os.path.join(bin_dir, "mlflow")
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([exe, "models", "serve", "-m", "models:/codetr-pyfunc@champion", "--env-manager",
                             "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if urllib.request.urlopen(f"{url}/ping", timeout=5).status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(1)
        images = [_png(3, 64, 80), _png(4, 40, 100)]
        body = {"dataframe_split": {"columns": ["image"],
                                    "data": [[base64.b64encode(b).decode()] for b in images]}}
        req = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            assert resp.status == 200
            preds = json.loads(resp.read())["predictions"]
        want = _in_memory(registered["model"], registered["job"], images)
        assert len(preds) == 2
        for p, w in zip(preds, want):
            assert p["error"] == "" and len(p["scores"]) == len(w["scores"]) > 0
            np.testing.assert_allclose(np.asarray(p["boxes"]), w["boxes"], atol=1e-4)
            np.testing.assert_allclose(np.asarray(p["scores"]), w["scores"], atol=1e-6)
            assert p["category_names"] == w["category_names"]
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=20)
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()
