"""Augmentations and collate: boxes after flip / resize / crop against hand-computed values, images without
boxes through every policy, padding + masks + normalisation. Tiny images, no Ray."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from pipeline.data.collate import Batch, collate, collate_samples
from pipeline.data.config import TINY_AUGMENT, AugmentConfig, DataConfig
from pipeline.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RandomSizeCrop,
    SanitizeBoxes,
    build_transforms,
    keep_ratio_size,
    prepare_sample,
    sample_seed,
)

BIG = 10_000


def png(h: int, w: int, value: int = 7) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def row(h: int, w: int, boxes: list[list[float]], labels: list[int] | None = None,
        iscrowd: list[int] | None = None, image_id: int = 1, value: int = 7) -> dict:
    """A shard row (the Parquet contract's columns): boxes xywh absolute."""
    n = len(boxes)
    return {"image_id": image_id, "width": w, "height": h, "image": png(h, w, value), "boxes": boxes,
            "labels": labels if labels is not None else list(range(n)),
            "iscrowd": iscrowd if iscrowd is not None else [0] * n}


def cxcywh_pixels(target: dict) -> torch.Tensor:
    """Target boxes back to xyxy pixels of the augmented image."""
    h, w = target["size"].tolist()
    cx, cy, bw, bh = (target["boxes"].double() * torch.tensor([w, h, w, h], dtype=torch.float64)).unbind(-1)
    return torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)


def run(aug: AugmentConfig, r: dict, *, train: bool = True, seed: int = 0, eval_size=(800, 1333),
        drop_crowd: bool = True):
    return prepare_sample(r, build_transforms(aug, train=train, eval_size=eval_size), seed=seed, epoch=0,
                          drop_crowd=drop_crowd)


def test_keep_ratio_size_matches_mmcv_rescale():
    assert keep_ratio_size(480, 640, 800, 1333) == (800, 1067)    # scale 5/3: 1066.67 rounds up
    assert keep_ratio_size(100, 300, 200, 450) == (150, 450)      # longer side caps: scale 1.5
    assert keep_ratio_size(100, 150, 160, 1333) == (160, 240)
    assert keep_ratio_size(20, 40, 32, 32) == (16, 32)            # LSJ: fit a square


def test_flip_boxes_hand_computed():
    # every branch is an identity except the flip: scales = the image's shorter side, crop range covers it
    aug = AugmentConfig(flip=1.0, scales=(4,), max_size=BIG, crop_scales=(4,), crop_max_size=BIG,
                        crop_size=(BIG, BIG))
    for seed in range(4):
        image, t = run(aug, row(4, 6, [[1, 1, 2, 2], [0, 0, 6, 1]]), seed=seed)
        assert image.shape == (3, 4, 6)
        # xyxy (1,1,3,3) -> (6-3, 1, 6-1, 3) = (3,1,5,3); (0,0,6,1) -> (0,0,6,1)
        want = torch.tensor([[3, 1, 5, 3], [0, 0, 6, 1]], dtype=torch.float64)
        torch.testing.assert_close(cxcywh_pixels(t), want)
        torch.testing.assert_close(t["boxes"][0], torch.tensor([4 / 6, 2 / 4, 2 / 6, 2 / 4]))
        assert t["labels"].tolist() == [0, 1]


def test_resize_boxes_hand_computed():
    # image 100x150 (h x w), shorter side -> 160: scale 1.6, size 160x240
    aug = AugmentConfig(flip=0.0, scales=(160,), max_size=BIG, crop_scales=(100,), crop_max_size=BIG,
                        crop_size=(BIG, BIG))
    for seed in range(4):  # both RandomChoice branches give the same result here
        image, t = run(aug, row(100, 150, [[10, 20, 30, 40]]), seed=seed)
        assert image.shape == (3, 160, 240)
        assert t["size"].tolist() == [160, 240] and t["orig_size"].tolist() == [100, 150]
        # xyxy (10,20,40,60) * 1.6 = (16,32,64,96); cxcywh / (240,160,240,160)
        torch.testing.assert_close(t["boxes"], torch.tensor([[40 / 240, 64 / 160, 48 / 240, 64 / 160]]))
        assert int(image.float().std()) == 0 and int(image[0, 0, 0]) == 7  # constant image stays constant
    # longer side capped: 100x300, short 200, max 450 -> scale 1.5 -> 150x450
    aug = AugmentConfig(flip=0.0, scales=(200,), max_size=450, crop_scales=(100,), crop_max_size=BIG,
                        crop_size=(BIG, BIG))
    _, t = run(aug, row(100, 300, [[30, 10, 60, 30]]))
    assert t["size"].tolist() == [150, 450]
    torch.testing.assert_close(cxcywh_pixels(t), torch.tensor([[45, 15, 135, 60]], dtype=torch.float64))


def test_random_crop_boxes_hand_computed():
    """The crop's parameters are replayed from the same seed; boxes are shifted, clipped, and a box left
    outside the crop is dropped with its label and iscrowd flag."""
    crop = RandomSizeCrop(20, 30)
    h, w = 50, 60
    boxes = tv_tensors.BoundingBoxes(torch.tensor([[5.0, 5, 45, 45], [0, 0, 2, 2], [10, 20, 12, 24]]),
                                     format="XYXY", canvas_size=(h, w))
    sample = {"image": tv_tensors.Image(torch.zeros(3, h, w, dtype=torch.uint8)), "boxes": boxes,
              "labels": torch.tensor([1, 2, 3]), "iscrowd": torch.tensor([0, 0, 1])}
    pipeline = torch.nn.Sequential(crop, SanitizeBoxes(1e-2))
    checked = 0
    for seed in range(20):
        torch.manual_seed(seed)
        p = crop.make_params([sample["image"]])
        torch.manual_seed(seed)
        out = pipeline(sample)
        top, left, ch, cw = p["top"], p["left"], p["height"], p["width"]
        assert 20 <= ch <= 30 and 20 <= cw <= 30 and out["image"].shape == (3, ch, cw)
        expected, keep = [], []
        for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
            e = [min(max(x1 - left, 0), cw), min(max(y1 - top, 0), ch),
                 min(max(x2 - left, 0), cw), min(max(y2 - top, 0), ch)]
            if e[2] - e[0] >= 1e-2 and e[3] - e[1] >= 1e-2:
                expected.append(e)
                keep.append(i)
        want = torch.tensor(expected, dtype=torch.float32).reshape(-1, 4)
        torch.testing.assert_close(out["boxes"].as_subclass(torch.Tensor), want)
        assert out["labels"].tolist() == [[1, 2, 3][i] for i in keep]
        assert out["iscrowd"].tolist() == [[0, 0, 1][i] for i in keep]
        checked += len(keep) < 3
    assert checked > 0  # some crops dropped a box


def test_lsj_hand_computed():
    # canvas 64, jitter fixed at 0.5 -> fit into 32x32: 20x40 -> 16x32 (scale 0.8); crop covers it; pad 114
    aug = AugmentConfig(policy="lsj", lsj_size=64, lsj_scale=(0.5, 0.5), flip=0.0)
    image, t = run(aug, row(20, 40, [[10, 5, 10, 10]], value=7))
    assert image.shape == (3, 64, 64) and t["size"].tolist() == [64, 64]
    assert (image[:, :16, :32] == 7).all()
    assert (image[:, 16:, :] == 114).all() and (image[:, :, 32:] == 114).all()
    # xyxy (10,5,20,15) * 0.8 = (8,4,16,12), normalised by the canvas
    torch.testing.assert_close(t["boxes"], torch.tensor([[12 / 64, 8 / 64, 8 / 64, 8 / 64]]))
    torch.testing.assert_close(t["scale_factor"], torch.tensor([0.8, 0.8]))
    # flip happens before the pad: x -> 32 - x inside the content, not the canvas
    image, t = run(dataclass_replace(aug, flip=1.0), row(20, 40, [[10, 5, 10, 10]]))
    torch.testing.assert_close(cxcywh_pixels(t), torch.tensor([[16, 4, 24, 12]], dtype=torch.float64))


def dataclass_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_eval_resize_and_scale_factor_map_back():
    source = [[10.0, 20.0, 30.0, 40.0], [0.0, 0.0, 150.0, 100.0]]
    cases = [(AugmentConfig(policy="detr"), (160, 240)), (AugmentConfig(policy="lsj", lsj_size=96), (96, 96))]
    for aug, size in cases:
        image, t = run(aug, row(100, 150, source, iscrowd=[0, 1]), train=False, eval_size=(160, 1000),
                       drop_crowd=False)
        assert tuple(image.shape[-2:]) == size and t["iscrowd"].tolist() == [0, 1]
        back = cxcywh_pixels(t) / t["scale_factor"].double().repeat(2)
        xyxy = torch.tensor(source, dtype=torch.float64)
        xyxy[:, 2:] += xyxy[:, :2]
        torch.testing.assert_close(back, xyxy, atol=1e-3, rtol=0)


@pytest.mark.parametrize("policy", ["detr", "lsj", "none"])
@pytest.mark.parametrize("train", [True, False])
def test_image_without_boxes_survives(policy, train):
    aug = dataclass_replace(TINY_AUGMENT, policy=policy)
    transform = build_transforms(aug, train=train, eval_size=(160, 400))
    for seed in range(6):
        image, t = prepare_sample(row(90, 130, []), transform, seed=seed, epoch=0, drop_crowd=True)
        assert image.dtype == torch.uint8 and image.shape[0] == 3 and min(image.shape[-2:]) > 0
        assert t["boxes"].shape == (0, 4) and t["boxes"].dtype == torch.float32
        assert t["labels"].shape == (0,) and t["labels"].dtype == torch.int64
        assert t["size"].tolist() == list(image.shape[-2:])


def test_crowd_only_image_becomes_empty_in_training():
    image, t = run(AugmentConfig(policy="none"), row(30, 40, [[1, 1, 5, 5]], iscrowd=[1]))
    assert t["boxes"].shape == (0, 4) and t["iscrowd"].shape == (0,)
    _, t = run(AugmentConfig(policy="none"), row(30, 40, [[1, 1, 5, 5]], iscrowd=[1]), drop_crowd=False)
    assert t["iscrowd"].tolist() == [1]


def test_detr_policy_sizes_and_boxes_in_range():
    aug = TINY_AUGMENT
    transform = build_transforms(aug, train=True)
    r = row(180, 300, [[10, 10, 100, 60], [200, 100, 90, 70], [0, 0, 300, 180]])
    sizes = set()
    for seed in range(30):
        image, t = prepare_sample(r, transform, seed=seed, epoch=0, drop_crowd=True)
        h, w = image.shape[-2:]
        assert max(h, w) <= aug.max_size + 1
        assert min(h, w) in aug.scales or max(h, w) >= aug.max_size - 1
        assert ((t["boxes"] >= 0) & (t["boxes"] <= 1)).all()
        sizes.add((h, w))
    assert len(sizes) > 3


def test_seeding_reproducible_and_epoch_dependent():
    transform = build_transforms(TINY_AUGMENT, train=True)
    rows = [row(120, 200, [[10, 10, 50, 40]], image_id=i) for i in range(6)]
    a = [prepare_sample(r, transform, seed=3, epoch=0, drop_crowd=True) for r in rows]
    b = [prepare_sample(r, transform, seed=3, epoch=0, drop_crowd=True) for r in rows]
    c = [prepare_sample(r, transform, seed=3, epoch=1, drop_crowd=True) for r in rows]
    for (ia, ta), (ib, tb) in zip(a, b):
        assert torch.equal(ia, ib) and torch.equal(ta["boxes"], tb["boxes"])
    assert any(not torch.equal(ta["boxes"], tc["boxes"]) or ia.shape != ic.shape
               for (ia, ta), (ic, tc) in zip(a, c))
    assert sample_seed(0, 1, 2) == sample_seed(0, 1, 2) != sample_seed(0, 2, 1)


def test_decode_size_mismatch_is_an_error():
    r = row(30, 40, [])
    r["width"] = 41
    with pytest.raises(ValueError, match="differs from the shard"):
        run(AugmentConfig(policy="none"), r)


def test_collate_pads_masks_and_normalises():
    a = torch.full((3, 2, 3), 10, dtype=torch.uint8)
    b = torch.full((3, 4, 2), 200, dtype=torch.uint8)
    ta = {"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]), "labels": torch.tensor([1]), "image_id": 1}
    tb = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "image_id": 2}
    batch = collate([a, b], [ta, tb])
    assert batch.images.shape == (2, 3, 4, 3) and batch.masks.shape == (2, 4, 3)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    for c in range(3):
        assert torch.allclose(batch.images[0, c, :2, :3], (10 - mean[c]) / std[c])
        assert torch.allclose(batch.images[1, c, :4, :2], (200 - mean[c]) / std[c])
    assert (batch.images[0, :, 2:, :] == 0).all() and (batch.images[1, :, :, 2:] == 0).all()
    assert batch.masks[0].tolist() == [[False] * 3, [False] * 3, [True] * 3, [True] * 3]
    assert batch.masks[1].tolist() == [[False, False, True]] * 4
    assert batch.targets[1]["boxes"].shape == (0, 4) and batch.targets[0]["image_id"] == 1
    # size_divisor rounds the padded size up
    batch = collate([a, b], [ta, tb], size_divisor=4)
    assert batch.images.shape == (2, 3, 4, 4) and batch.masks[:, :, 3].all()
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and len(moved) == 2


def test_collate_samples_for_dataloader():
    transform = build_transforms(AugmentConfig(policy="none"), train=True)
    samples = [prepare_sample(row(20 + 5 * i, 30, [[1, 1, 4, 4]] * i, image_id=i), transform, seed=0, epoch=0,
                              drop_crowd=True) for i in range(3)]
    batch = collate_samples(samples)
    assert batch.images.shape == (3, 3, 30, 30)
    assert [t["boxes"].shape[0] for t in batch.targets] == [0, 1, 2]
    assert (~batch.masks).sum(dim=(1, 2)).tolist() == [20 * 30, 25 * 30, 30 * 30]


def test_config_validation_messages():
    with pytest.raises(ValueError, match="augment.policy"):
        AugmentConfig(policy="mosaic")
    with pytest.raises(ValueError, match="augment.crop_size"):
        AugmentConfig(crop_size=(600, 384))
    with pytest.raises(ValueError, match="data.batch_size"):
        DataConfig(batch_size=0)
    assert DataConfig().augment.scales == tuple(range(480, 801, 32))
