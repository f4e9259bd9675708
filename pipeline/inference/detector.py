"""Images -> detections with a loaded model: the one prediction path of the batch job, the MLflow pyfunc and the
export parity checks.

    det = Detector(load_for_inference(uri), device="cpu")
    out = det.predict([img_a, img_b])   # img: (3, H, W) uint8 RGB at source size
    out[0]["boxes"]  # (K, 4) float32 xyxy in source pixels; "scores" (K,), "labels" (K,) int64,
                     # "category_ids" (K,) int64, "category_names" list of K str
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pipeline.data.collate import collate
from pipeline.inference.model_io import LoadedModel


class Detector:
    def __init__(self, loaded: LoadedModel, device: str | torch.device = "cpu") -> None:
        self.loaded = loaded
        self.device = torch.device(device)
        self.model = loaded.model.to(self.device).eval()

    @torch.no_grad()
    def predict(self, images: Sequence[torch.Tensor], image_ids: Sequence[int] | None = None,
                score_threshold: float = 0.0) -> list[dict[str, Any]]:
        """One batch: the eval transform per image, pad + normalise (collate), forward, boxes back to source
        pixels. Detections with score <= `score_threshold` are dropped."""
        if not images:
            return []
        ids = list(image_ids) if image_ids is not None else list(range(len(images)))
        prepared = [self.loaded.preprocess.prepare(im, i) for im, i in zip(images, ids)]
        return self.predict_prepared([p[0] for p in prepared], [p[1] for p in prepared], score_threshold)

    @torch.no_grad()
    def predict_prepared(self, images: Sequence[Any], targets: Sequence[dict[str, Any]],
                         score_threshold: float = 0.0) -> list[dict[str, Any]]:
        """Images already through `PreprocessConfig.prepare` ((3, h, w) uint8 + their target dicts)."""
        batch = collate(list(images), list(targets), size_divisor=self.loaded.preprocess.size_divisor,
                        device=self.device)
        preds = self.model(batch.images, batch.masks, batch.targets)
        return [self._named(p, score_threshold) for p in preds]

    def _named(self, pred: dict[str, torch.Tensor], score_threshold: float) -> dict[str, Any]:
        boxes = pred["boxes"].detach().float().cpu().numpy().reshape(-1, 4)
        scores = pred["scores"].detach().float().cpu().numpy().reshape(-1)
        labels = pred["labels"].detach().cpu().numpy().astype(np.int64).reshape(-1)
        if score_threshold > 0:
            keep = scores > score_threshold
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        return {
            "boxes": boxes, "scores": scores, "labels": labels,
            "category_ids": np.array([self.loaded.category_id(int(lab)) for lab in labels], dtype=np.int64),
            "category_names": [self.loaded.category_name(int(lab)) for lab in labels],
        }
