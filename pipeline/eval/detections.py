"""Detections of many images as a handful of flat NumPy arrays: what an evaluation worker sends to rank 0.

    dets = Detections.from_predictions([(image_id, {"boxes", "scores", "labels"}), ...], max_dets=100)
    parts = pipeline.dist.gather_objects(dets)                # rank 0: one Detections per rank
    results = Detections.concat(parts).coco_results(cat_ids)  # (N, 7) float64 for faster-coco-eval's loadRes

At 24 bytes per detection (float32 xyxy + score, int32 label; image ids stored once per image with a count) a
worker's part pickles into one buffer per array, instead of a Python object per detection: 10,000 images x 100
detections are 24 MB. Capping to `max_dets` per image happens on the worker, before anything is sent.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Detections:
    """images (M,) int64: every predicted image, also those without detections, each once;
    counts (M,) int32: detections of each image, stored consecutively in image order;
    boxes (N, 4) float32 xyxy in source-image pixels; scores (N,) float32; labels (N,) int32 contiguous
    (model) labels, N = counts.sum(). Within an image, detections are in non-increasing score order."""

    images: np.ndarray
    counts: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        m, n = len(self.images), len(self.scores)
        if len(self.counts) != m or self.boxes.shape != (n, 4) or len(self.labels) != n or int(self.counts.sum()) != n:
            raise ValueError(f"inconsistent Detections: {m} images, counts summing to {int(self.counts.sum())}, "
                             f"boxes {self.boxes.shape}, {n} scores, {len(self.labels)} labels; expected counts "
                             f"summing to N with boxes (N, 4), scores (N,), labels (N,)")

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.images, self.counts, self.boxes, self.scores, self.labels))

    @property
    def image_ids(self) -> np.ndarray:
        """(N,) int64: the image of every detection."""
        return np.repeat(self.images, self.counts)

    @staticmethod
    def empty() -> Detections:
        return Detections(np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros((0, 4), np.float32),
                          np.zeros(0, np.float32), np.zeros(0, np.int32))

    @staticmethod
    def from_predictions(predictions: Iterable[tuple[int, dict[str, Any]]], max_dets: int = 0) -> Detections:
        """[(image_id, {boxes (K, 4) xyxy, scores (K,), labels (K,)}), ...] (NumPy arrays or tensors) -> the
        top-`max_dets` scoring detections of each image (all of them for max_dets = 0), ties in input order."""
        images, counts, boxes, scores, labels = [], [], [], [], []
        for image_id, pred in predictions:
            s = np.asarray(_numpy(pred["scores"]), dtype=np.float32).reshape(-1)
            keep = _top(s, max_dets)
            images.append(int(image_id))
            counts.append(len(keep))
            boxes.append(np.asarray(_numpy(pred["boxes"]), dtype=np.float32).reshape(-1, 4)[keep])
            scores.append(s[keep])
            labels.append(np.asarray(_numpy(pred["labels"])).reshape(-1)[keep].astype(np.int32))
        if not images:
            return Detections.empty()
        return Detections(np.asarray(images, np.int64), np.asarray(counts, np.int32), np.concatenate(boxes),
                          np.concatenate(scores), np.concatenate(labels))

    @staticmethod
    def concat(parts: Sequence[Detections]) -> Detections:
        """The parts one after the other (e.g. every rank's, in rank order). An image in two parts is an error:
        the val split must give every image to exactly one worker."""
        parts = [p for p in parts if p is not None]
        if not parts:
            return Detections.empty()
        out = Detections(*(np.concatenate([getattr(p, f) for p in parts])
                           for f in ("images", "counts", "boxes", "scores", "labels")))
        if len(np.unique(out.images)) != len(out.images):
            dup = np.unique(out.images)[np.unique(out.images, return_counts=True)[1] > 1]
            raise ValueError(f"images predicted more than once: {dup[:10].tolist()} (every val image must go to "
                             f"exactly one worker)")
        return out

    def capped(self, k: int) -> Detections:
        """At most the first (= highest scoring) k detections of each image; self when none has more."""
        if k <= 0 or not len(self.counts) or int(self.counts.max()) <= k:
            return self
        starts = np.cumsum(self.counts) - self.counts
        keep = (np.arange(len(self)) - np.repeat(starts, self.counts)) < k
        return Detections(self.images, np.minimum(self.counts, k).astype(np.int32), self.boxes[keep],
                          self.scores[keep], self.labels[keep])

    def coco_results(self, label_to_cat: Sequence[int]) -> np.ndarray:
        """(N, 7) float64 rows [image_id, x, y, w, h, score, category_id] (faster-coco-eval's `loadRes` array
        format; xywh from the float32 xyxy in float64, as COCO result dicts would hold them)."""
        lut = np.asarray(label_to_cat, dtype=np.int64)
        if len(self) and (self.labels.min() < 0 or self.labels.max() >= len(lut)):
            raise ValueError(f"detection labels span {int(self.labels.min())}..{int(self.labels.max())}, expected "
                             f"0..{len(lut) - 1} (one per category)")
        out = np.empty((len(self), 7), dtype=np.float64)
        out[:, 0] = self.image_ids
        out[:, 1:5] = self.boxes
        out[:, 3:5] -= out[:, 1:3]
        out[:, 5] = self.scores
        out[:, 6] = lut[self.labels]
        return out


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, highest first, ties in input order (a stable sort, as Python's `sorted`)."""
    order = np.argsort(-scores, kind="stable")
    return order[:k] if k > 0 else order


def _numpy(x: Any) -> Any:
    """A tensor (any device; bf16 -> float32) as a NumPy array; anything else unchanged."""
    if not hasattr(x, "detach"):
        return x
    x = x.detach()
    return (x.float() if x.is_floating_point() else x).cpu().numpy()
