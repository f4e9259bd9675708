"""Round trip: generated COCO-format data -> shards (the real builder) -> Ray Data loader without augmentation
-> collated batches -> boxes back in absolute xywh equal the source annotations for every image, labels map
back to the same category ids through the manifest.

Precision: targets are float32 cxcywh normalised by the image size, so the absolute xywh recovered from them
match the source within 1e-4 px (a few float32 ulps at these coordinates, < 512 px), not bit-exactly.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from pipeline import storage
from pipeline.data import shards as shards_mod
from pipeline.data import synthetic
from pipeline.data.config import AugmentConfig, DataConfig
from pipeline.data.loader import build_dataset, iter_batches
from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def test_coco_to_shards_to_loader_round_trip(ray_local, tmp_path):
    src = synthetic.generate_dataset(str(tmp_path / "src"), synthetic.SyntheticConfig(
        images=10, splits=("train",), image_size=(64, 128), crowd_fraction=0.4, empty_fraction=0.2,
        png_fraction=0.5, seed=3))
    paths = src.splits["train"]
    out = str(tmp_path / "shards")
    manifest = shards_mod.build_shards(paths.annotations, paths.images, out, split="train", rows_per_shard=4,
                                       parallel=False, verbose=False)
    assert not any(manifest.splits["train"].counts.values())  # nothing skipped or repaired

    coco = storage.read_json(paths.annotations)
    anns: dict[int, list[dict]] = {img["id"]: [] for img in coco["images"]}
    for a in coco["annotations"]:
        anns[a["image_id"]].append(a)
    files = {img["id"]: img["file_name"] for img in coco["images"]}
    assert any(not v for v in anns.values()) and any(a.get("iscrowd") for v in anns.values() for a in v)

    cfg = DataConfig(shards=out, augment=AugmentConfig(policy="none"), num_workers=2, map_batch_size=4)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    seen, compared, worst = set(), 0, 0.0
    for batch in iter_batches(build_dataset(cfg, "train", train=False), 3, "cpu"):
        for i, t in enumerate(batch.targets):
            image_id = t["image_id"]
            seen.add(image_id)
            h, w = t["size"].tolist()
            assert t["orig_size"].tolist() == [h, w]
            # normalised cxcywh -> absolute xywh, in float64 from the float32 targets
            scale = torch.tensor([w, h, w, h], dtype=torch.float64)
            cx, cy, bw, bh = (t["boxes"].double() * scale).unbind(-1)
            xywh = torch.stack([cx - bw / 2, cy - bh / 2, bw, bh], -1)
            source = torch.tensor([a["bbox"] for a in anns[image_id]], dtype=torch.float64).reshape(-1, 4)
            assert xywh.shape == source.shape, image_id
            if len(source):
                worst = max(worst, (xywh - source).abs().max().item())
                assert worst <= 1e-4, image_id
                compared += len(source)
            ids = [manifest.categories[label]["id"] for label in t["labels"].tolist()]
            assert ids == [a["category_id"] for a in anns[image_id]], image_id
            assert t["iscrowd"].tolist() == [int(a.get("iscrowd", 0)) for a in anns[image_id]], image_id
            if files[image_id].endswith(".png"):  # lossless: pixels survive decode + normalise exactly
                pixels = np.asarray(Image.open(io.BytesIO(storage.read_bytes(
                    storage.join(paths.images, files[image_id])))).convert("RGB")).copy()
                back = batch.images[i, :, :h, :w] * std + mean
                assert (back - torch.from_numpy(pixels).permute(2, 0, 1).float()).abs().max() < 1e-3
    assert seen == set(anns) and compared == len(coco["annotations"]) > 0
    print(f"round trip: {compared} boxes, worst |xywh - source| = {worst:.2e} px")
