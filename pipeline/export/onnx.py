"""The deployed Co-DETR model as ONNX, and its parity check against the eager model with onnxruntime.

    path, info = export_onnx(loaded.model, "model.onnx", canvas=(400, 400))
    report = check_parity(loaded.model, path, images, img_sizes)   # max |diff| of boxes (px) and scores

What the ONNX graph contains (opset 17, TorchScript-based `torch.onnx.export`):
    inputs   images    (B, 3, H, W) float32: RGB, ImageNet-normalised ((x - mean) / std on 0..255 pixels),
                       the image at the top-left, zero padding right / bottom; H, W = the export canvas
             img_sizes (B, 2) int64: (h, w) of each image inside the canvas (the padding mask comes from it)
    outputs  boxes  (B, K, 4) float32 xyxy in canvas pixels, clamped to the image (h, w)
             scores (B, K) float32 sigmoid scores, descending;  labels (B, K) int64 contiguous label ids
    K = min(test.topk, num_queries * num_classes): the raw top-k of the Q x C scores (the model's `detr_topk`).
Dynamic: the batch size. Fixed: the canvas H, W (a level's size enters the graph as a constant because the
encoder, the query selection and the attention read level sizes back as Python ints); any image up to the canvas
size works, placed at the top-left with `img_sizes`. Deformable attention is the per-level `grid_sample` path
(plain ONNX ops), chosen with `deform_attn_impl("reference")`.
Left to the caller: decode + resize (the eval transform: `PreprocessConfig.prepare`), normalise, pad into the
canvas, NMS (the model's default is class-aware soft-NMS, `pipeline.models.query_head.postprocess.apply_nms`;
hard NMS with torchvision or onnxruntime-extensions also works), max detections per image, dividing boxes by the
resize scale factor back to source pixels, and label -> category (categories.json next to the model).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.models.box_ops import box_cxcywh_to_xyxy

OPSET = 17


class TopKDetector(nn.Module):
    """Deployed CoDETR -> raw top-k detections in canvas pixels, no NMS (the ONNX graph's forward)."""

    def __init__(self, model: nn.Module, topk: int | None = None) -> None:
        super().__init__()
        self.model = model
        q, c = model.transformer.num_queries, model.num_classes
        self.topk = min(int(topk or model.test_cfg.topk), q * c)

    def forward(self, images: Tensor, img_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """images (B, 3, H, W) normalised, zero-padded; img_sizes (B, 2) int64 (h, w) ->
        boxes (B, K, 4) xyxy pixels, scores (B, K), labels (B, K) int64."""
        b = images.shape[0]
        run_sizes = img_sizes
        if not self.model.with_padding_mask:  # LSJ: boxes normalised by the canvas (as CoDETR.predict)
            run_sizes = torch.ones_like(img_sizes) * torch.tensor(list(images.shape[-2:]), dtype=img_sizes.dtype)
        out = self.model.run(images, run_sizes)
        logits, boxes = out.logits[-1], out.boxes[-1]  # (B, Q, C), (B, Q, 4) cxcywh normalised by run_sizes
        num_classes = logits.shape[-1]
        scores, idx = logits.sigmoid().reshape(b, -1).topk(self.topk, dim=1)
        labels = idx % num_classes
        query = idx // num_classes
        xyxy = box_cxcywh_to_xyxy(torch.gather(boxes, 1, query.unsqueeze(-1).expand(-1, -1, 4)))  # (B, K, 4)
        hw = run_sizes.to(xyxy.dtype)
        scale = torch.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], -1).unsqueeze(1)  # (B, 1, 4) w h w h
        xyxy = torch.minimum(torch.clamp(xyxy * scale, min=0.0), scale)
        return xyxy, scores, labels


@dataclass
class ExportInfo:
    path: str
    opset: int
    canvas: tuple[int, int]
    topk: int
    seconds: float


def export_onnx(model: nn.Module, path: str, canvas: tuple[int, int], topk: int | None = None,
                opset: int = OPSET) -> ExportInfo:
    """Write the deployed `model` (eval mode, CPU) as ONNX to the local `path`. The model is not changed (the
    exporter runs on a copy: tracing may touch module state)."""
    from pipeline.models.layers.deform_attn import deform_attn_impl

    if opset < 17:
        raise ValueError(f"opset must be >= 17, got {opset}")
    h, w = (int(v) for v in canvas)
    wrapper = TopKDetector(copy.deepcopy(model).cpu().eval(), topk).eval()
    images = torch.zeros(2, 3, h, w)
    sizes = torch.tensor([[h, w], [max(1, h * 3 // 4), max(1, w * 2 // 3)]], dtype=torch.int64)
    t0 = time.perf_counter()
    with deform_attn_impl("reference"), torch.no_grad():
        torch.onnx.export(
            wrapper, (images, sizes), path, dynamo=False, opset_version=opset,
            input_names=["images", "img_sizes"], output_names=["boxes", "scores", "labels"],
            dynamic_axes={"images": {0: "batch"}, "img_sizes": {0: "batch"}, "boxes": {0: "batch"},
                          "scores": {0: "batch"}, "labels": {0: "batch"}},
        )
    return ExportInfo(path, opset, (h, w), wrapper.topk, time.perf_counter() - t0)


def canvas_batch(images: list[Tensor], canvas: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """(3, h_i, w_i) uint8 network images (after the eval transform) -> (images (B, 3, H, W) normalised with
    zero padding on the canvas, img_sizes (B, 2) int64): the ONNX model's inputs."""
    from pipeline.data.collate import normalize_

    h, w = canvas
    out = torch.zeros(len(images), 3, h, w)
    sizes = []
    for i, im in enumerate(images):
        ih, iw = int(im.shape[-2]), int(im.shape[-1])
        if ih > h or iw > w:
            raise ValueError(f"image {i}: {ih}x{iw} does not fit the {h}x{w} export canvas")
        out[i, :, :ih, :iw] = normalize_(im.float().unsqueeze(0))[0]
        sizes.append([ih, iw])
    return out, torch.tensor(sizes, dtype=torch.int64)


def check_parity(model: nn.Module, path: str, images: Tensor, img_sizes: Tensor) -> dict[str, Any]:
    """onnxruntime vs the eager deployed model (its default attention kernel) on the same inputs.
    Returns max |diff| of boxes (pixels) and scores, and whether labels agree, over every top-k slot."""
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    t0 = time.perf_counter()
    boxes, scores, labels = session.run(None, {"images": images.numpy(), "img_sizes": img_sizes.numpy()})
    ort_s = time.perf_counter() - t0
    wrapper = TopKDetector(model.eval(), None)
    t0 = time.perf_counter()
    with torch.no_grad():
        e_boxes, e_scores, e_labels = (t.numpy() for t in wrapper(images, img_sizes))
    eager_s = time.perf_counter() - t0
    box_diff, swaps = _tie_aware_box_diff(boxes, scores, labels, e_boxes, e_scores, e_labels)
    return {"max_box_diff_px": box_diff, "max_score_diff": float(np.abs(scores - e_scores).max()),
            "labels_equal": bool((labels == e_labels)[np.abs(boxes - e_boxes).max(-1) <= 1e-3].all()),
            "tie_swaps": swaps,
            "batch": int(images.shape[0]), "onnxruntime_s": round(ort_s, 3), "eager_s": round(eager_s, 3)}


def _tie_aware_box_diff(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, e_boxes: np.ndarray,
                        e_scores: np.ndarray, e_labels: np.ndarray, score_tol: float = 1e-6) -> tuple[float, int]:
    """Max box |diff| slot by slot, except that slots whose scores tie (|diff| <= score_tol) may hold the tied
    detections in another order (top-k breaks exact ties by index differently in the two runtimes): such a
    slot is compared with the closest eager detection of the same label and score. Returns (max diff, #swaps)."""
    diff = np.abs(boxes - e_boxes).max(-1)  # (B, K)
    worst, swaps = 0.0, 0
    for b, k in zip(*np.nonzero(diff > 1e-3)):
        same = (e_labels[b] == labels[b, k]) & (np.abs(e_scores[b] - scores[b, k]) <= score_tol)
        if not same.any():
            worst = max(worst, float(diff[b, k]))
            continue
        worst = max(worst, float(np.abs(e_boxes[b][same] - boxes[b, k]).max(-1).min()))
        swaps += 1
    return max(worst, float(diff[diff <= 1e-3].max(initial=0.0))), swaps
