"""The tiny Co-DINO (K = 0) overfits two synthetic images: the loss falls and the boxes are found (AP50 >= 0.9).

Two 96x96 images of noise with 2-3 flat-coloured rectangles each; class = colour (3 classes). Trained from
scratch on CPU (trainable BatchNorm, AdamW 5e-4, the full one-to-one + encoder + denoising losses).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import yaml
from torchvision.ops import box_iou

from pipeline.config import from_dict
from pipeline.models.config import ModelConfig

REPO = Path(__file__).resolve().parents[1]

COLOURS = torch.tensor([[2.0, -1.5, -1.5], [-1.5, 2.0, -1.5], [-1.5, -1.5, 2.0]])  # normalised RGB per class
IMAGES = [  # (x1, y1, x2, y2, class) in pixels
    [(8, 10, 40, 50, 0), (50, 20, 90, 44, 1), (30, 60, 70, 90, 2)],
    [(12, 12, 60, 36, 2), (56, 50, 88, 88, 0)],
]


def tiny_config(num_classes: int) -> ModelConfig:
    """configs/model/co_dino_tiny.yaml with resnet10t, 50 queries, K = 0."""
    data = yaml.safe_load((REPO / "configs" / "model" / "co_dino_tiny.yaml").read_text())["model"]
    data["num_classes"] = num_classes
    data["backbone"]["name"] = "resnet10t"
    data["transformer"].update(ffn_dim=128, num_queries=50)
    data["dn"]["num_dn_queries"] = 10
    data["test"].update(topk=50, max_per_img=50)
    data["co"] = {"aux_heads": []}
    return from_dict(ModelConfig, data)


def synthetic_batch(size: int = 96):
    g = torch.Generator().manual_seed(0)
    images = 0.3 * torch.randn(len(IMAGES), 3, size, size, generator=g)
    targets = []
    for i, objects in enumerate(IMAGES):
        boxes = torch.tensor([o[:4] for o in objects], dtype=torch.float32)
        labels = torch.tensor([o[4] for o in objects])
        for (x1, y1, x2, y2), c in zip(boxes.long().tolist(), labels.tolist()):
            images[i, :, y1:y2, x1:x2] = COLOURS[c][:, None, None]
        cxcywh = torch.cat([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], 1) / size
        targets.append({"boxes": cxcywh, "labels": labels, "size": torch.tensor([size, size]), "xyxy": boxes})
    return images, targets


def ap50(dets: list[dict], targets: list[dict], num_classes: int) -> float:
    """Mean over classes of all-point interpolated AP at IoU 0.5 (greedy matching by score, VOC style)."""
    aps = []
    for c in range(num_classes):
        scored = []  # (score, image, box)
        n_gt = 0
        for i, (d, t) in enumerate(zip(dets, targets)):
            n_gt += int((t["labels"] == c).sum())
            keep = d["labels"] == c
            scored += [(float(s), i, b) for s, b in zip(d["scores"][keep], d["boxes"][keep])]
        scored.sort(key=lambda x: -x[0])
        used = [torch.zeros(len(t["labels"]), dtype=torch.bool) for t in targets]
        tp = []
        for _, i, box in scored:
            gt = targets[i]["xyxy"]
            iou = box_iou(box[None], gt)[0] * (targets[i]["labels"] == c) * (~used[i])
            hit = bool(iou.numel()) and float(iou.max()) >= 0.5
            if hit:
                used[i][int(iou.argmax())] = True
            tp.append(1.0 if hit else 0.0)
        tp_t = torch.tensor(tp)
        cum_tp = tp_t.cumsum(0)
        recall = cum_tp / max(n_gt, 1)
        precision = cum_tp / torch.arange(1, len(tp) + 1)
        ap, prev_r = 0.0, 0.0
        for k in range(len(tp)):  # all-point: precision envelope from the right
            if tp[k]:
                ap += float(precision[k:].max()) * (float(recall[k]) - prev_r)
                prev_r = float(recall[k])
        aps.append(ap)
    return sum(aps) / len(aps)


def test_tiny_model_overfits_two_images():
    from pipeline.models import build_model

    torch.manual_seed(0)
    cfg = tiny_config(3)
    model = build_model(cfg)
    images, targets = synthetic_batch()
    masks = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-4)
    history, score, step = [], 0.0, 0
    start = time.time()
    for step in range(1, 301):  # usually done after 40-60 steps; evaluated every 20
        model.train()
        losses = model(images, masks, targets)
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        history.append(float(loss.detach()))
        if step % 20 == 0:
            model.eval()
            score = ap50(model(images, masks), targets, num_classes=3)
            if score >= 0.9:
                break
    elapsed = time.time() - start
    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert score >= 0.9, f"AP50 {score:.3f} after {step} steps ({elapsed:.0f} s), loss {first:.2f} -> {last:.2f}"
    assert last < 0.8 * first, f"loss did not fall: {first:.3f} -> {last:.3f} in {step} steps"


def test_ap50_helper():
    _, targets = synthetic_batch()
    perfect = [{"boxes": t["xyxy"], "scores": torch.ones(len(t["labels"])), "labels": t["labels"]} for t in targets]
    assert ap50(perfect, targets, 3) == pytest.approx(1.0)
    shifted = [{**d, "boxes": d["boxes"] + 30} for d in perfect]
    assert ap50(shifted, targets, 3) < 0.5
