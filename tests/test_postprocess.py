"""Soft-NMS against a plain transcription of mmcv's CPU kernel, hard NMS against a greedy loop, class-aware
offsets, Co-DINO top-k / rescale, and the authors' golden detections (bit-exact)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

import pipeline.models.query_head.postprocess as pp
from pipeline.models.query_head.postprocess import (
    apply_nms,
    batched_soft_nms,
    detr_postprocess,
    detr_postprocess_with_pre_nms,
    detr_topk,
    soft_nms,
)

GOLDEN = Path("/work/shared/golden/co_dino_r50")


def reference_soft_nms(boxes, scores, iou_threshold, sigma, min_score, method):
    """mmcv softnms_cpu, line by line, in float32 scalars (readable, slow)."""
    f32 = np.float32
    x1, y1, x2, y2 = ([f32(v) for v in boxes[:, k].tolist()] for k in range(4))
    area = [(x2[k] - x1[k]) * (y2[k] - y1[k]) for k in range(len(x1))]
    sc = [f32(v) for v in scores.tolist()]
    inds = list(range(len(sc)))
    cols = [x1, y1, x2, y2, area, sc, inds]
    n, i = len(sc), 0
    while i < n:
        max_pos = i
        for pos in range(i + 1, n):
            if sc[max_pos] < sc[pos]:
                max_pos = pos
        for c in cols:
            c[i], c[max_pos] = c[max_pos], c[i]
        pos = i + 1
        while pos < n:
            w = max(f32(0), min(x2[i], x2[pos]) - max(x1[i], x1[pos]))
            h = max(f32(0), min(y2[i], y2[pos]) - max(y1[i], y1[pos]))
            inter = w * h
            ovr = inter / (area[i] + area[pos] - inter)
            weight = f32(1)
            if method == "naive" and ovr >= f32(iou_threshold):
                weight = f32(0)
            elif method == "linear" and ovr >= f32(iou_threshold):
                weight = f32(1) - ovr
            elif method == "gaussian":
                weight = np.exp(-(ovr * ovr) / f32(sigma))
            sc[pos] = sc[pos] * weight
            if sc[pos] < f32(min_score):
                for c in cols:
                    c[pos] = c[n - 1]
                n -= 1
                pos -= 1
            pos += 1
        i += 1
    return torch.tensor(inds[:n], dtype=torch.long), torch.tensor(np.array(sc[:n], dtype=np.float32))


def _clustered_boxes(n: int, seed: int, ties: bool = False):
    """Jittered copies of a few base boxes (many IoUs above 0.8), scores with some below min_score."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(max(n // 6, 1), 4, generator=g) * 50
    base[:, 2:] = base[:, :2] + 10 + torch.rand(base.shape[0], 2, generator=g) * 20
    boxes = base[torch.randint(0, base.shape[0], (n,), generator=g)] + torch.randn(n, 4, generator=g) * 0.8
    scores = torch.rand(n, generator=g)
    scores[torch.rand(n, generator=g) < 0.1] *= 1e-3
    if ties:
        scores[1::3] = scores[0::3][: len(scores[1::3])]  # exact duplicate scores
    return boxes, scores


@pytest.mark.parametrize("method", ["linear", "gaussian", "naive"])
@pytest.mark.parametrize(("n", "seed", "ties"), [(40, 0, False), (60, 1, True), (1, 2, False), (25, 3, True)])
def test_soft_nms_matches_kernel_transcription(method, n, seed, ties):
    boxes, scores = _clustered_boxes(n, seed, ties)
    keep, new_scores = soft_nms(boxes, scores, iou_threshold=0.5, sigma=0.5, min_score=1e-3, method=method)
    ref_keep, ref_scores = reference_soft_nms(boxes, scores, 0.5, 0.5, 1e-3, method)
    assert torch.equal(keep, ref_keep)
    if method == "gaussian":  # exp() may differ by an ulp between NumPy's vector and scalar paths
        assert torch.allclose(new_scores, ref_scores, rtol=1e-6, atol=0)
    else:
        assert torch.equal(new_scores, ref_scores)
    assert (new_scores[:-1] >= new_scores[1:]).all()  # selection order = non-increasing scores


def test_soft_nms_mmcv_docstring_example_and_first_box_kept():
    boxes = torch.tensor([[4.0, 3.0, 5.0, 3.0], [4.0, 3.0, 5.0, 4.0]] + [[3.0, 1.0, 3.0, 1.0]] * 4)
    scores = torch.tensor([0.9, 0.9, 0.5, 0.5, 0.4, 0.0])
    keep, _ = soft_nms(boxes, scores, iou_threshold=0.6, sigma=0.5)
    assert len(keep) == 5  # as asserted in mmcv's soft_nms docstring
    keep, new = soft_nms(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([1e-6]))
    assert keep.tolist() == [0] and new.tolist() == [pytest.approx(1e-6)]
    keep, new = soft_nms(torch.zeros(0, 4), torch.zeros(0))
    assert keep.shape == (0,) and new.shape == (0,)
    with pytest.raises(ValueError, match="method"):
        soft_nms(boxes, scores, method="cubic")


def test_batched_soft_nms_is_class_aware():
    box = torch.tensor([[10.0, 10.0, 20.0, 20.0]])
    boxes = box.repeat(3, 1)
    scores = torch.tensor([0.9, 0.8, 0.7])
    keep, new = batched_soft_nms(boxes, scores, torch.tensor([0, 1, 1]))
    assert keep.tolist() == [0, 1]  # IoU 1 within class 1: score * (1 - 1) = 0 < min_score, dropped
    assert new.tolist() == pytest.approx([0.9, 0.8])
    keep, _ = batched_soft_nms(boxes, scores, torch.tensor([0, 1, 1]), class_agnostic=True)
    assert keep.tolist() == [0]


def test_batched_soft_nms_equals_per_class_runs_and_split_path(monkeypatch):
    boxes, scores = _clustered_boxes(90, 4)
    labels = torch.randint(0, 4, (90,), generator=torch.Generator().manual_seed(5))
    keep, new = batched_soft_nms(boxes, scores, labels, iou_threshold=0.6)
    # the same IoUs need the same (offset) coordinates: float32 rounding of x + offset changes them by ~1e-5
    offset_boxes = boxes + (labels.float() * (boxes.max() + 1))[:, None]
    per_class = {}
    for c in range(4):
        idx = (labels == c).nonzero().squeeze(1)
        k, s = soft_nms(offset_boxes[idx], scores[idx], iou_threshold=0.6)
        per_class.update(dict(zip(idx[k].tolist(), s.tolist())))
    assert dict(zip(keep.tolist(), new.tolist())) == per_class
    monkeypatch.setattr(pp, "_SPLIT_THR", 10)  # mmcv's large-N path: classes one by one, then sorted
    keep_split, new_split = batched_soft_nms(boxes, scores, labels, iou_threshold=0.6)
    assert dict(zip(keep_split.tolist(), new_split.tolist())) == per_class
    assert (new_split[:-1] >= new_split[1:]).all()


def reference_hard_nms(boxes, scores, labels, thr):
    """Greedy NMS per class: visit by score, suppress same-class boxes with IoU > thr."""
    order = sorted(range(len(scores)), key=lambda k: -scores[k].item())
    keep, dead = [], set()
    iou = box_iou(boxes, boxes)
    for a in order:
        if a in dead:
            continue
        keep.append(a)
        for b in order:
            if b not in dead and b != a and labels[b] == labels[a] and iou[a, b] > thr:
                dead.add(b)
    return keep


def test_hard_nms_matches_greedy_loop():
    boxes, scores = _clustered_boxes(50, 6)
    labels = torch.randint(0, 3, (50,), generator=torch.Generator().manual_seed(7))
    keep, kept_scores = apply_nms(boxes, scores, labels, "hard", iou_threshold=0.5)
    assert keep.tolist() == reference_hard_nms(boxes, scores, labels, 0.5)
    assert torch.equal(kept_scores, scores[keep])
    keep_none, s_none = apply_nms(boxes, scores, labels, "none")
    assert len(keep_none) == 50 and (s_none[:-1] >= s_none[1:]).all()
    with pytest.raises(ValueError, match="nms must be"):
        apply_nms(boxes, scores, labels, "fast")


def test_detr_topk_labels_queries_and_rescale():
    q, nc = 5, 3
    logits = torch.full((q, nc), -10.0)
    logits[3, 2], logits[1, 0], logits[4, 1] = 4.0, 3.0, 2.0
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2]] * q)
    boxes[3] = torch.tensor([0.95, 0.5, 0.2, 0.4])  # sticks out on the right: clamped to the image
    out = detr_topk(logits, boxes, (100, 200), topk=3, orig_size=(50, 400))
    assert out["labels"].tolist() == [2, 0, 1] and out["queries"].tolist() == [3, 1, 4]
    assert out["scores"][0].item() == pytest.approx(torch.sigmoid(torch.tensor(4.0)).item())
    # query 3 in pixels: x 170..200 (clamped from 210), y 30..70; scale (sy, sx) = (100/50, 200/400)
    assert out["boxes"][0].tolist() == pytest.approx([340.0, 15.0, 400.0, 35.0])
    same = detr_topk(logits, boxes, (100, 200), topk=3, scale_hw=(2.0, 0.5))
    assert torch.equal(same["boxes"], out["boxes"])
    thr = detr_topk(logits, boxes, (100, 200), topk=15, score_threshold=0.5)
    assert len(thr["scores"]) == 3


def test_detr_postprocess_options():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(30, 4, generator=g) * 3
    boxes = torch.rand(30, 4, generator=g) * 0.5 + 0.25
    pre, det = detr_postprocess_with_pre_nms(logits, boxes, (64, 48), topk=50, max_per_img=20)
    assert len(pre["scores"]) == 50 and len(det["scores"]) <= 20
    assert (det["scores"] <= pre["scores"].max()).all()
    none = detr_postprocess(logits, boxes, (64, 48), topk=50, nms="none", max_per_img=20)
    assert torch.equal(none["scores"], pre["scores"][:20])
    hard = detr_postprocess(logits, boxes, (64, 48), topk=50, nms="hard", iou_threshold=0.5, max_per_img=100)
    assert set(hard["scores"].tolist()) <= set(pre["scores"].tolist())
    with pytest.raises(ValueError, match="nms must be"):
        detr_postprocess(logits, boxes, (64, 48), nms="soft-ish")


@pytest.mark.skipif(not (GOLDEN / "expected.pt").exists(), reason="golden outputs not available")
def test_detections_match_authors_golden_bit_exact():
    """mmdet 3.x Co-DINO: top-300 of sigmoid(900 x 80), class-aware linear soft-NMS (0.8), at most 300."""
    exp = torch.load(GOLDEN / "expected.pt", weights_only=False)
    logits, boxes = exp["cls_logits_first_last"][1], exp["all_bbox_preds"][5]
    assert (
        "'max_per_img': 300" in exp["meta"]["test_cfg"] and "'iou_threshold': 0.8" in exp["meta"]["test_cfg"]
    )
    for b, img_size in enumerate(exp["meta"]["img_shapes"]):
        pre, det = detr_postprocess_with_pre_nms(
            logits[b], boxes[b], img_size, topk=300, nms="soft", iou_threshold=0.8, max_per_img=300
        )
        for ours, ref in ((pre, exp["det_pre_nms"][b]), (det, exp["det"][b])):
            assert torch.equal(ours["boxes"], ref["bboxes"])
            assert torch.equal(ours["scores"], ref["scores"])
            assert torch.equal(ours["labels"], ref["labels"])
