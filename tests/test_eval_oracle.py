"""Oracle test of the evaluation path: a "perfect network" whose outputs are the eval-transformed ground truth.

Every augment policy's eval transform (detr, lsj, none) takes a portrait and a landscape source image with known
boxes; the images are collated into one padded batch; the network is replaced by a function that returns, for
each image, the transformed ground-truth boxes (normalised the way the model normalises them: by the unpadded
size, or by the padded canvas when `with_padding_mask` is off, the authors' LSJ setting). The model's own
`predict` (rescale to the source image, top-k, NMS, cap) and the COCO evaluation must then give AP 1.0 and every
box within 0.5 px of its source. No backbone runs: the test checks the geometry of the eval path only.
"""

from __future__ import annotations

import types

import pytest
import torch
from torchvision.io import encode_png

from pipeline.config import load_config
from pipeline.data.collate import collate_samples
from pipeline.data.config import AugmentConfig
from pipeline.data.transforms import build_transforms, prepare_sample
from pipeline.eval.coco_eval import coco_gt_from_rows
from pipeline.eval.evaluator import predict, score
from pipeline.models import build_model

NUM_CLASSES = 5
CATEGORIES = [{"id": 10 + i, "name": f"c{i}"} for i in range(NUM_CLASSES)]
SOURCES = {1: (480, 640), 2: (640, 480)}  # image_id -> (h, w): landscape and portrait


def _row(image_id: int, h: int, w: int, gen: torch.Generator) -> dict:
    image = torch.randint(0, 255, (3, h, w), dtype=torch.uint8, generator=gen)
    boxes, labels = [], []
    for i in range(6):  # non-overlapping columns so class-aware NMS never merges two sources
        x0 = (w / 6) * i + float(torch.rand(1, generator=gen)) * 8
        bw = w / 6 - 12
        y0 = float(torch.rand(1, generator=gen)) * h * 0.4
        bh = 20 + float(torch.rand(1, generator=gen)) * h * 0.5
        boxes.append([x0, y0, bw, bh])
        labels.append(i % NUM_CLASSES)
    return {"image_id": image_id, "file_name": f"{image_id}.png", "width": w, "height": h,
            "image": encode_png(image).numpy().tobytes(), "boxes": boxes, "labels": labels, "iscrowd": [0] * 6}


@pytest.fixture(scope="module")
def model():
    cfg = load_config("configs/model/co_dino_tiny.yaml").model
    return build_model(cfg).eval()


def _perfect_run(targets: list[dict], queries: int):
    """A stand-in for `CoDETR.run`: the targets as detections, normalised by the sizes `predict` asks for."""

    def run(images: torch.Tensor, run_sizes: torch.Tensor, dn=None):
        b = images.shape[0]
        logits = torch.full((1, b, queries, NUM_CLASSES), -12.0)
        boxes = torch.full((1, b, queries, 4), 0.5)
        boxes[..., 2:] = 0.01  # filler queries: tiny boxes at the centre with a very low score
        for i, t in enumerate(targets):
            h, w = (float(v) for v in t["size"])
            rh, rw = (float(v) for v in run_sizes[i])
            pix = t["boxes"] * torch.tensor([w, h, w, h])  # cxcywh in network-input pixels
            n = len(pix)
            boxes[0, i, :n] = pix / torch.tensor([rw, rh, rw, rh])
            logits[0, i, torch.arange(n), t["labels"]] = 8.0 - 0.1 * torch.arange(n, dtype=torch.float32)
        return types.SimpleNamespace(logits=logits, boxes=boxes)

    return run


POLICIES = {
    "detr": AugmentConfig(policy="detr"),  # eval: keep-ratio (800, 1333)
    "lsj": AugmentConfig(policy="lsj", lsj_size=1536),  # the LVIS recipe's canvas
    "none": AugmentConfig(policy="none"),
}


@pytest.mark.parametrize("with_padding_mask", [True, False], ids=["mask", "nomask"])
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_perfect_network_scores_ap_one(model, policy: str, with_padding_mask: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    rows = [_row(i, h, w, gen) for i, (h, w) in SOURCES.items()]
    transform = build_transforms(POLICIES[policy], train=False)
    samples = [prepare_sample(r, transform, seed=0, epoch=0, drop_crowd=False) for r in rows]
    batch = collate_samples(samples, size_divisor=32)
    assert batch.images.shape[-2] > min(s[0].shape[-2] for s in samples) or policy == "lsj"  # really padded

    model.with_padding_mask = with_padding_mask
    model.run = _perfect_run(batch.targets, queries=30)
    try:
        preds = predict(model, [batch])
    finally:
        del model.run
    by_id = dict(preds)
    for row in rows:
        det = by_id[row["image_id"]]
        for (x, y, w, h), label in zip(row["boxes"], row["labels"]):
            src = torch.tensor([x, y, x + w, y + h])
            same = torch.as_tensor(det["boxes"])[torch.as_tensor(det["labels"]) == label]
            err = (same - src).abs().max(1).values.min()
            assert err < 0.5, f"{policy}: image {row['image_id']} box {src.tolist()} off by {err:.3f} px"
    metrics = score(preds, coco_gt_from_rows(rows, CATEGORIES), "coco", 100)
    assert metrics["AP"] == pytest.approx(1.0), metrics
