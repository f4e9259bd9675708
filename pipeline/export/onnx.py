"""The deployed Co-DETR model as ONNX, and its parity check against the eager model with onnxruntime.

    path, info = export_onnx(loaded.model, "model.onnx", example=(400, 400))             # raw top-k
    path, info = export_onnx(loaded.model, "model.onnx", example=(400, 400), nms="hard")  # hard NMS inside
    report = check_parity(loaded.model, path, *padded_batch(images))   # max |diff| of boxes (px) and scores

What the ONNX graph contains (opset 18, `torch.onnx.export(dynamo=True)`: torch.export, then onnxscript):
    inputs   images    (B, 3, H, W) float32: RGB, ImageNet-normalised ((x - mean) / std on 0..255 pixels),
                       each image at the top-left, zero padding right / bottom to the batch's H, W
             img_sizes (B, 2) int64: (h, w) of each image inside (H, W) (the padding mask comes from it)
    outputs, nms="none" (raw top-k, for soft-NMS or anything else in the caller):
             boxes  (B, K, 4) float32 xyxy in input pixels, clamped to the image (h, w)
             scores (B, K) float32 sigmoid scores, descending;  labels (B, K) int64 contiguous label ids
             K = min(test.topk, num_queries * num_classes): the raw top-k of the Q x C scores (`detr_topk`)
    outputs, nms="hard" (the top-k above through class-aware hard NMS per image, ONNX NonMaxSuppression):
             batch_index (N,) int64, boxes (N, 4), scores (N,), labels (N,): the kept detections of every image,
             in descending score order over the batch (select an image's rows by batch_index); IoU threshold
             `model.test.iou_threshold` (0.8), no score threshold, no per-image cap (`test.max_per_img`)
Dynamic: the batch size and the image size H, W (>= 65 each, so that the coarsest level keeps more than one row
and column; no upper bound), so no fixed canvas. Deformable attention is the per-level `grid_sample` path (plain
ONNX ops), chosen with `deform_attn_impl("reference")`.
Left to the caller: decode + resize (the eval transform: `PreprocessConfig.prepare`; an LSJ model, which has no
padding mask, expects the LSJ canvas as H, W, as in training), normalise, pad, the model's default class-aware
soft-NMS (`pipeline.models.query_head.postprocess.apply_nms`) when exporting raw top-k, max detections per image,
dividing boxes by the resize scale factor back to source pixels, and label -> category (categories.json next to
the model).
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.models.box_ops import box_cxcywh_to_xyxy

OPSET = 18  # the dynamo exporter's lowest opset


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
            one = torch.ones_like(img_sizes[:, :1])  # (B, 1): H, W stay symbolic under torch.export
            run_sizes = torch.cat([one * images.shape[-2], one * images.shape[-1]], 1)
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


class HardNMS(nn.Module):
    """Class-aware hard NMS per image over a batch of top-k detections, in one `torchvision.ops.nms` call (exported
    as ONNX NonMaxSuppression): boxes are offset by (image index x classes + label) x (max coordinate + 1), so
    boxes of different images or labels never overlap, the same trick as `torchvision.ops.batched_nms`. Not that
    function itself: above 4,000 box values on CPU (any real top-k, e.g. 2 x 900 x 4) it loops over
    `torch.unique(labels)`, a data-dependent loop torch.export cannot trace; checked at K = 900, 80 classes: the
    exported graph keeps exactly `batched_nms`'s detections."""

    def __init__(self, num_classes: int, iou_threshold: float) -> None:
        super().__init__()
        self.num_classes, self.iou_threshold = int(num_classes), float(iou_threshold)

    def forward(self, boxes: Tensor, scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """boxes (B, K, 4), scores (B, K), labels (B, K) -> batch_index (N,) int64, boxes (N, 4), scores (N,),
        labels (N,) int64 of the kept detections, by descending score."""
        from torchvision.ops import nms

        batch_index = torch.arange(boxes.shape[0], device=boxes.device).unsqueeze(1).expand_as(labels)
        group = (batch_index * self.num_classes + labels).to(boxes.dtype)
        shifted = boxes + (group * (boxes.max() + 1)).unsqueeze(-1)
        keep = nms(shifted.reshape(-1, 4), scores.reshape(-1), self.iou_threshold)
        return (batch_index.reshape(-1)[keep], boxes.reshape(-1, 4)[keep], scores.reshape(-1)[keep],
                labels.reshape(-1)[keep])


def append_hard_nms(topk_path: str, path: str, num_classes: int, iou_threshold: float) -> None:
    """The raw top-k graph at `topk_path` followed by `HardNMS`, written to `path`: the small NMS graph is exported
    on its own (seconds) and joined to the network with `onnx.compose.merge_models`, so a hard-NMS export costs
    one network export, not two."""
    import onnx
    from onnx import compose

    topk = onnx.load(topk_path)
    k = topk.graph.output[0].type.tensor_type.shape.dim[1].dim_value  # K is static: min(topk, Q x C)
    example = (torch.rand(2, k, 4) * 50, torch.rand(2, k), torch.randint(0, num_classes, (2, k)))
    example[0][..., 2:] += example[0][..., :2]
    batch = torch.export.Dim("batch", min=1)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nms_path = os.path.join(tmp, "nms.onnx")
        torch.onnx.export(HardNMS(num_classes, iou_threshold), example, nms_path, dynamo=True,
                          opset_version=topk.opset_import[0].version,
                          input_names=["topk_boxes", "topk_scores", "topk_labels"], output_names=OUTPUTS["hard"],
                          dynamic_shapes={"boxes": {0: batch}, "scores": {0: batch}, "labels": {0: batch}},
                          verbose=False)
        nms_graph = onnx.load(nms_path)
    nms_graph.ir_version = topk.ir_version
    first = compose.add_prefix(topk, "net_", rename_inputs=False)  # outputs net_boxes, net_scores, net_labels
    second = compose.add_prefix(nms_graph, "nms_", rename_inputs=False, rename_outputs=False)
    io_map = [(f"net_{a}", f"topk_{a}") for a in OUTPUTS["none"]]
    onnx.save(compose.merge_models(first, second, io_map=io_map), path)


class HardNMSDetector(nn.Module):
    """`TopKDetector` then `HardNMS` (the eager form of the `nms="hard"` graph)."""

    def __init__(self, model: nn.Module, topk: int | None = None, iou_threshold: float | None = None) -> None:
        super().__init__()
        self.topk_detector = TopKDetector(model, topk)
        iou = model.test_cfg.iou_threshold if iou_threshold is None else iou_threshold
        self.nms = HardNMS(model.num_classes, iou)

    def forward(self, images: Tensor, img_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.nms(*self.topk_detector(images, img_sizes))


OUTPUTS = {"none": ["boxes", "scores", "labels"], "hard": ["batch_index", "boxes", "scores", "labels"]}
MIN_SIDE = 65  # the smallest H, W the graph takes: the stride-64 level keeps >= 2 rows and columns


@dataclass
class ExportInfo:
    path: str
    opset: int
    example: tuple[int, int]
    topk: int
    nms: str
    seconds: float


def export_onnx(model: nn.Module, path: str, example: tuple[int, int] = (128, 128), topk: int | None = None,
                opset: int = OPSET, nms: str = "none") -> ExportInfo:
    """Write the deployed `model` (eval mode, CPU) as ONNX to the local `path`, dynamic in batch and image size
    (`example` is only the traced size). The model is not changed (the exporter runs on a copy)."""
    from pipeline.models.layers.deform_attn import deform_attn_impl

    if opset < OPSET:
        raise ValueError(f"opset must be >= {OPSET} (the dynamo exporter's lowest), got {opset}")
    if nms not in OUTPUTS:
        raise ValueError(f"nms must be one of {sorted(OUTPUTS)}, got {nms!r}")
    h, w = (int(v) for v in example)
    if min(h, w) < MIN_SIDE:
        raise ValueError(f"example size {h}x{w}: expected both sides >= {MIN_SIDE}")
    wrapper = TopKDetector(copy.deepcopy(model).cpu().eval(), topk).eval()
    images = torch.zeros(2, 3, h, w)
    sizes = torch.tensor([[h, w], [max(1, h * 3 // 4), max(1, w * 2 // 3)]], dtype=torch.int64)
    batch = torch.export.Dim("batch", min=1)
    dynamic = {"images": {0: batch, 2: torch.export.Dim("height", min=MIN_SIDE),
                          3: torch.export.Dim("width", min=MIN_SIDE)}, "img_sizes": {0: batch}}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        topk_path = path if nms == "none" else os.path.join(tmp, "topk.onnx")
        with deform_attn_impl("reference"), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's own deprecation chatter
            torch.onnx.export(wrapper, (images, sizes), topk_path, dynamo=True, opset_version=opset,
                              input_names=["images", "img_sizes"], output_names=OUTPUTS["none"],
                              dynamic_shapes=dynamic, verbose=False)
        if nms == "hard":
            append_hard_nms(topk_path, path, model.num_classes, model.test_cfg.iou_threshold)
    return ExportInfo(path, opset, (h, w), wrapper.topk, nms, time.perf_counter() - t0)


def padded_batch(images: list[Tensor], size: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """(3, h_i, w_i) uint8 network images (after the eval transform; an LSJ model's already fill its canvas) ->
    (images (B, 3, H, W) normalised, zero padding right / bottom, img_sizes (B, 2) int64): the ONNX model's inputs,
    the training collate (`pipeline.data.collate.collate`) padded on to `size`, by default to at least MIN_SIDE."""
    from pipeline.data.collate import collate

    batch = collate(images, [{} for _ in images])
    sizes = torch.tensor([[int(im.shape[-2]), int(im.shape[-1])] for im in images], dtype=torch.int64)
    h, w = size or (max(MIN_SIDE, batch.images.shape[-2]), max(MIN_SIDE, batch.images.shape[-1]))
    if batch.images.shape[-2] > h or batch.images.shape[-1] > w:
        raise ValueError(f"images up to {tuple(batch.images.shape[-2:])} do not fit the {h}x{w} input")
    pad = (0, w - batch.images.shape[-1], 0, h - batch.images.shape[-2])  # left, right, top, bottom
    return torch.nn.functional.pad(batch.images, pad), sizes


def check_parity(model: nn.Module, path: str, images: Tensor, img_sizes: Tensor) -> dict[str, Any]:
    """onnxruntime vs the eager deployed model (its default attention kernel) on the same inputs. Raw top-k:
    max |diff| of boxes (pixels) and scores over every slot, labels equal. Hard NMS: the same over the kept
    detections, which must be the eager `batched_nms` of each image's top-k (same count, image, label)."""
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    t0 = time.perf_counter()
    got = session.run(None, {"images": images.numpy(), "img_sizes": img_sizes.numpy()})
    ort_s = time.perf_counter() - t0
    wrapper = TopKDetector(model.eval(), None)
    t0 = time.perf_counter()
    with torch.no_grad():
        e_boxes, e_scores, e_labels = wrapper(images, img_sizes)
    eager_s = time.perf_counter() - t0
    timing = {"batch": int(images.shape[0]), "onnxruntime_s": round(ort_s, 3), "eager_s": round(eager_s, 3)}
    if names == OUTPUTS["hard"]:
        return {**_hard_nms_parity(model, got, e_boxes, e_scores, e_labels), **timing}
    boxes, scores, labels = got
    e_boxes, e_scores, e_labels = e_boxes.numpy(), e_scores.numpy(), e_labels.numpy()
    box_diff, swaps = _tie_aware_box_diff(boxes, scores, labels, e_boxes, e_scores, e_labels)
    return {"max_box_diff_px": box_diff, "max_score_diff": float(np.abs(scores - e_scores).max()),
            "labels_equal": bool((labels == e_labels)[np.abs(boxes - e_boxes).max(-1) <= 1e-3].all()),
            "tie_swaps": swaps, **timing}


def _hard_nms_parity(model: nn.Module, got: list[np.ndarray], e_boxes: Tensor, e_scores: Tensor,
                     e_labels: Tensor) -> dict[str, Any]:
    """Compare the graph's kept detections with the eager class-aware hard NMS of each image's top-k."""
    from pipeline.models.query_head.postprocess import apply_nms

    batch_index, boxes, scores, labels = got
    box_diff, score_diff, labels_equal, kept = 0.0, 0.0, True, []
    for b in range(e_boxes.shape[0]):
        keep, k_scores = apply_nms(e_boxes[b], e_scores[b], e_labels[b], "hard", model.test_cfg.iou_threshold)
        mine = batch_index == b
        kept.append(int(mine.sum()))
        if kept[-1] != len(keep):
            return {"max_box_diff_px": float("inf"), "max_score_diff": float("inf"), "labels_equal": False,
                    "kept": kept, "eager_kept": len(keep), "image": b}
        order = np.argsort(-scores[mine], kind="stable")  # the graph's order is by score over the batch
        box_diff = max(box_diff, float(np.abs(boxes[mine][order] - e_boxes[b][keep].numpy()).max(initial=0.0)))
        score_diff = max(score_diff, float(np.abs(scores[mine][order] - k_scores.numpy()).max(initial=0.0)))
        labels_equal &= bool((labels[mine][order] == e_labels[b][keep].numpy()).all())
    return {"max_box_diff_px": box_diff, "max_score_diff": score_diff, "labels_equal": labels_equal, "kept": kept}


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
