"""Detection augmentations with torchvision.transforms.v2 on tv_tensors (no Ray here: runs in a notebook too).

A *sample* flowing through the transforms is a dict:
    image:    tv_tensors.Image (3, H, W) uint8 RGB
    boxes:    tv_tensors.BoundingBoxes (N, 4) XYXY absolute pixels, float32
    labels:   (N,) int64 contiguous 0..C-1;  iscrowd: (N,) int64
    image_id: int;  orig_size: (h, w) of the source image
`prepare_sample` turns one shard row into `(image, target)` where `image` is the augmented (3, h, w) uint8
(normalisation happens at collate time, after padding decisions) and `target` is the model's target dict
(see `to_target`).

Policies (CO_DETR_SPEC.md 5.2; sizes from `AugmentConfig`):
- detr (train): RandomFlip(0.5), then uniformly one of
    (a) keep-ratio resize, shorter side from `scales` (480..800 step 32), longer side <= `max_size` (1333);
    (b) keep-ratio resize, shorter side from `crop_scales` (400/500/600), longer <= `crop_max_size` (4200)
        -> random crop with h, w each uniform in [min(side, 384), min(side, 600)] -> the resize of (a).
- lsj (train): resize to fit a square of `lsj_size * uniform(0.1, 2.0)` -> random crop of at most
  `lsj_size` x `lsj_size` -> drop tiny boxes -> RandomFlip(0.5) -> pad bottom/right to the square canvas
  with 114. The canvas is the image: `size` = canvas and boxes are normalised by it (the authors'
  `with_attn_mask=False`); the collated pixel mask is all False.
- eval: detr -> keep-ratio resize (800, 1333); lsj -> resize to fit the canvas + pad 114; none -> identity.
- none (train and eval): no geometric change (round-trip tests, debugging).
Sizes are computed as mmcv's keep-ratio `rescale_size` (scale = min(long / longer, short / shorter), sides
rounded half up); boxes scale by the realised per-axis ratio, as mmdet does.

Deviations, on purpose: boxes narrower/shorter than `min_box_size` (1e-2 px) are dropped at the end of every
train branch (the authors drop w <= 0 after their crop; LSJ uses FilterAnnotations 1e-2). LSJ's CopyPaste
needs instance masks and is not implemented (the authors' bbox-only variant has none either).

Randomness: every random draw comes from torch's global generator, re-seeded per sample from
`sample_seed(seed, epoch, image_id)` inside `torch.random.fork_rng`, so an image's augmentation depends
only on (run seed, epoch, image id), not on which worker or rank processes it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torchvision
from torchvision import tv_tensors
from torchvision.io import ImageReadMode
from torchvision.ops import box_convert
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from pipeline.data.config import AugmentConfig

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # RGB, 0..255 pixel units
IMAGENET_STD = (58.395, 57.12, 57.375)


def keep_ratio_size(height: int, width: int, short: int, long: int) -> tuple[int, int]:
    """(new_h, new_w) of a keep-ratio resize with shorter side <= `short` and longer side <= `long`.

    mmcv `rescale_size`: scale = min(long / max(h, w), short / min(h, w)); sides rounded half up (>= 1).
    """
    scale = min(long / max(height, width), short / min(height, width))
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


class RandomShorterSideResize(v2.Transform):
    """Keep-ratio resize to a shorter side drawn uniformly from `scales`, longer side capped at `max_size`."""

    def __init__(self, scales: Sequence[int], max_size: int, antialias: bool = False) -> None:
        super().__init__()
        self.scales = tuple(int(s) for s in scales)
        self.max_size = int(max_size)
        self.antialias = antialias

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        short = self.scales[int(torch.randint(len(self.scales), ()))]
        return {"size": list(keep_ratio_size(height, width, short, self.max_size))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, size=params["size"], antialias=self.antialias)


class RandomScaleJitter(v2.Transform):
    """LSJ resize: fit the image into a square of side int(`size` * uniform(lo, hi)), keeping the ratio."""

    def __init__(self, size: int, scale_range: tuple[float, float], antialias: bool = False) -> None:
        super().__init__()
        self.size = int(size)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.antialias = antialias

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        lo, hi = self.scale_range
        side = max(1, int(self.size * (lo + float(torch.rand(())) * (hi - lo))))
        return {"size": list(keep_ratio_size(height, width, side, side))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, size=params["size"], antialias=self.antialias)


class RandomSizeCrop(v2.Transform):
    """Crop of height and width each uniform in [min(side, lo), min(side, hi)] at a uniform offset.

    mmdet's RandomCrop(crop_type="absolute_range", allow_negative_crop=True); with lo == hi it is the LSJ
    "absolute" crop. Boxes are shifted and clipped to the crop; boxes left empty are removed later by
    `SanitizeBoxes` (an image may end with no boxes and stays a valid sample).
    """

    def __init__(self, lo: int, hi: int) -> None:
        super().__init__()
        self.lo, self.hi = int(lo), int(hi)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        crop_h = int(torch.randint(min(height, self.lo), min(height, self.hi) + 1, ()))
        crop_w = int(torch.randint(min(width, self.lo), min(width, self.hi) + 1, ()))
        top = int(torch.randint(0, height - crop_h + 1, ()))
        left = int(torch.randint(0, width - crop_w + 1, ()))
        return {"top": top, "left": left, "height": crop_h, "width": crop_w}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


def _labels_and_crowd(sample: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    return sample["labels"], sample["iscrowd"]


class SanitizeBoxes(v2.SanitizeBoundingBoxes):
    """Drop boxes with width or height < `min_size` pixels, with their labels and iscrowd flags.

    torchvision's class insists on min_size >= 1; the authors filter at 1e-2 px, so the threshold is set here.
    """

    def __init__(self, min_size: float = 1e-2) -> None:
        super().__init__(labels_getter=_labels_and_crowd)
        self.min_size = float(min_size)
        self.min_area = 0.0


class DetectionTransform:
    """A v2 augmentation followed, for LSJ, by a bottom/right pad onto a square canvas.

    The pad is kept outside the v2 pipeline so that the size of the content before padding is known
    (`content_size`, used for the eval `scale_factor`).
    """

    def __init__(self, augment: v2.Transform, canvas: int | None = None, pad_value: int = 0) -> None:
        self.augment = augment
        self.canvas = canvas
        self.pad_value = pad_value

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        out = dict(self.augment(sample))
        height, width = out["image"].shape[-2:]
        out["content_size"] = (int(height), int(width))
        if self.canvas is not None:
            if height > self.canvas or width > self.canvas:
                raise ValueError(f"image {out.get('image_id')}: {height}x{width} does not fit the "
                                 f"{self.canvas}x{self.canvas} canvas")
            padding = [0, 0, self.canvas - int(width), self.canvas - int(height)]  # left, top, right, bottom
            out["image"] = F.pad(out["image"], padding, fill=self.pad_value)
            out["boxes"] = F.pad(out["boxes"], padding)
        return out

    def __repr__(self) -> str:
        return f"DetectionTransform({self.augment!r}, canvas={self.canvas}, pad_value={self.pad_value})"


def build_transforms(aug: AugmentConfig, *, train: bool, eval_size: tuple[int, int] = (800, 1333)
                     ) -> DetectionTransform:
    """The train or eval pipeline of `aug.policy` (see the module docstring)."""
    aa = aug.antialias
    if aug.policy == "none":
        return DetectionTransform(v2.Identity())
    if aug.policy == "lsj":
        if not train:
            fit = RandomShorterSideResize((aug.lsj_size,), aug.lsj_size, aa)
            return DetectionTransform(fit, canvas=aug.lsj_size, pad_value=aug.lsj_pad_value)
        augment = v2.Compose([
            RandomScaleJitter(aug.lsj_size, aug.lsj_scale, aa),
            RandomSizeCrop(aug.lsj_size, aug.lsj_size),
            SanitizeBoxes(aug.min_box_size),
            v2.RandomHorizontalFlip(aug.flip),
        ])
        return DetectionTransform(augment, canvas=aug.lsj_size, pad_value=aug.lsj_pad_value)
    if aug.policy == "detr":
        if not train:
            return DetectionTransform(RandomShorterSideResize((eval_size[0],), eval_size[1], aa))
        resize = RandomShorterSideResize(aug.scales, aug.max_size, aa)
        crop_branch = v2.Compose([
            RandomShorterSideResize(aug.crop_scales, aug.crop_max_size, aa),
            RandomSizeCrop(*aug.crop_size),
            RandomShorterSideResize(aug.scales, aug.max_size, aa),
        ])
        augment = v2.Compose([
            v2.RandomHorizontalFlip(aug.flip),
            v2.RandomChoice([resize, crop_branch]),
            SanitizeBoxes(aug.min_box_size),
        ])
        return DetectionTransform(augment)
    raise ValueError(f"unknown augment policy {aug.policy!r}; expected one of 'detr', 'lsj', 'none'")


# ------------------------------------------------------------------------------------------------------------
# shard row -> sample -> (image, target)


def sample_seed(seed: int, epoch: int, image_id: int) -> int:
    """A 63-bit seed for one image's augmentation in one epoch (stable across processes and Python runs)."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{image_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def decode_image(data: bytes, height: int, width: int, image_id: int) -> torch.Tensor:
    """Encoded JPEG/PNG bytes -> (3, height, width) uint8 RGB; the size must match the shard's."""
    image = torchvision.io.decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                        mode=ImageReadMode.RGB)
    if tuple(image.shape[-2:]) != (height, width):
        raise ValueError(f"image {image_id}: decoded size {tuple(image.shape[-2:])} (h, w) differs from the "
                         f"shard's ({height}, {width})")
    return image


def make_sample(row: Mapping[str, Any], *, drop_crowd: bool) -> dict[str, Any]:
    """One shard row (columns of the shard contract) -> a sample dict of tv_tensors.

    Boxes go from COCO xywh to XYXY and are clipped to the image; with `drop_crowd`, iscrowd=1 boxes are
    removed (an image left with no boxes is still a valid sample).
    """
    height, width, image_id = int(row["height"]), int(row["width"]), int(row["image_id"])
    image = decode_image(row["image"], height, width, image_id)
    xyxy = torch.as_tensor(row["boxes"], dtype=torch.float32).reshape(-1, 4).clone()
    xyxy[:, 2:] += xyxy[:, :2]
    labels = torch.as_tensor(row["labels"], dtype=torch.int64).reshape(-1)
    iscrowd = torch.as_tensor(row["iscrowd"], dtype=torch.int64).reshape(-1)
    if not len(labels) == len(iscrowd) == len(xyxy):
        raise ValueError(f"image {image_id}: {len(xyxy)} boxes, {len(labels)} labels and {len(iscrowd)} "
                         f"iscrowd flags; expected equal counts")
    if drop_crowd:
        keep = iscrowd == 0
        xyxy, labels, iscrowd = xyxy[keep], labels[keep], iscrowd[keep]
    boxes = tv_tensors.BoundingBoxes(xyxy, format="XYXY", canvas_size=(height, width))
    return {
        "image": tv_tensors.Image(image),
        "boxes": F.clamp_bounding_boxes(boxes),
        "labels": labels,
        "iscrowd": iscrowd,
        "image_id": image_id,
        "orig_size": (height, width),
    }


def to_target(sample: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """An augmented sample -> (image (3, h, w) uint8, target dict).

    Target keys:
        boxes:        (N, 4) float32 cxcywh normalised by `size` (the unpadded augmented image; LSJ: canvas)
        labels:       (N,) int64;  iscrowd: (N,) int64
        image_id:     int
        size:         (2,) int64 (h, w) of the augmented image, before batch padding
        orig_size:    (2,) int64 (h, w) of the source image
        scale_factor: (2,) float32 (sx, sy) = content (w, h) / orig (w, h), content = the image before the
                      LSJ canvas pad; at eval, source pixels = xyxy pixels of `size` / scale_factor.repeat(2)
    """
    image = sample["image"].as_subclass(torch.Tensor).contiguous()
    height, width = image.shape[-2:]
    xyxy = sample["boxes"].as_subclass(torch.Tensor).to(torch.float64)
    norm = torch.tensor([width, height, width, height], dtype=torch.float64)
    boxes = (box_convert(xyxy, "xyxy", "cxcywh") / norm).to(torch.float32)
    (oh, ow), (ch, cw) = sample["orig_size"], sample["content_size"]
    target = {
        "boxes": boxes.reshape(-1, 4),
        "labels": sample["labels"].to(torch.int64),
        "iscrowd": sample["iscrowd"].to(torch.int64),
        "image_id": int(sample["image_id"]),
        "size": torch.tensor([height, width], dtype=torch.int64),
        "orig_size": torch.tensor([oh, ow], dtype=torch.int64),
        "scale_factor": torch.tensor([cw / ow, ch / oh], dtype=torch.float32),
    }
    return image, target


def prepare_sample(row: Mapping[str, Any], transform: DetectionTransform, *, seed: int, epoch: int,
                   drop_crowd: bool) -> tuple[torch.Tensor, dict[str, Any]]:
    """Decode + augment one shard row reproducibly -> (image (3, h, w) uint8, target dict: `to_target`)."""
    sample = make_sample(row, drop_crowd=drop_crowd)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sample_seed(seed, epoch, sample["image_id"]))
        sample = transform(sample)
    return to_target(sample)
