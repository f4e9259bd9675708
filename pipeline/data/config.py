"""Data configs: where the shards are, how images are augmented, how batches are formed.

Pure frozen dataclasses (no torch, no ray), embedded in the job config as `data`:

    data:
      shards: s3://bucket/coco-shards          # root holding manifest.json and <split>/part-*.parquet
      batch_size: 2                            # images per training worker and step
      augment: {policy: detr, scales: [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800], max_size: 1333}

Defaults are the authors' (CO_DETR_SPEC.md 5.2): the "DETR" multi-scale policy with shorter side 480..800
step 32 (longer side <= 1333) or resize {400, 500, 600} -> random crop 384..600 -> the same resize; eval at
shorter side 800 / longer <= 1333; no padding to a multiple (size_divisor 1). `TINY_AUGMENT` is the
small-image variant for the demo / CPU configs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

POLICIES = ("detr", "lsj", "none")


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation; the eval pipeline follows `policy` too (see `pipeline.data.transforms`)."""

    policy: Literal["detr", "lsj", "none"] = "detr"
    """detr: flip + multi-scale resize / resize-crop-resize; lsj: large scale jitter on a square canvas;
    none: no geometric change at all (images at source size, train and eval)."""
    scales: tuple[int, ...] = tuple(range(480, 801, 32))
    """detr: candidate shorter sides (pixels) of the keep-ratio resize."""
    max_size: int = 1333
    """detr: longest side after the resize is at most this."""
    crop_scales: tuple[int, ...] = (400, 500, 600)
    """detr crop branch: shorter sides of the resize before the crop."""
    crop_max_size: int = 4200
    """detr crop branch: longest-side limit of that first resize (the authors' 4200: practically none)."""
    crop_size: tuple[int, int] = (384, 600)
    """detr crop branch: crop height and width are each uniform in [min(side, lo), min(side, hi)] pixels."""
    lsj_size: int = 1024
    """lsj: side of the square canvas (train and eval)."""
    lsj_scale: tuple[float, float] = (0.1, 2.0)
    """lsj: the image is resized to fit a square of lsj_size * uniform(lo, hi) before the canvas crop."""
    lsj_pad_value: int = 114
    """lsj: value of the canvas padding, in 0..255 pixel units (before normalisation)."""
    flip: float = 0.5
    """Probability of a horizontal flip (detr and lsj)."""
    min_box_size: float = 1e-2
    """Boxes narrower or shorter than this (pixels) after augmentation are dropped (FilterAnnotations)."""
    antialias: bool = False
    """Antialias when downscaling. False matches the authors' cv2 bilinear resize (mmcv.imresize)."""

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"augment.policy must be one of {list(POLICIES)}, got {self.policy!r}")
        for name in ("scales", "crop_scales"):
            values = getattr(self, name)
            if not values or any(int(v) < 1 for v in values):
                raise ValueError(f"augment.{name} must be a non-empty list of positive sizes, got {values!r}")
        for name in ("max_size", "crop_max_size", "lsj_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"augment.{name} must be >= 1, got {getattr(self, name)!r}")
        lo, hi = self.crop_size
        if not 1 <= lo <= hi:
            raise ValueError(f"augment.crop_size must be (lo, hi) with 1 <= lo <= hi, got {self.crop_size!r}")
        lo_s, hi_s = self.lsj_scale
        if not 0 < lo_s <= hi_s:
            raise ValueError(f"augment.lsj_scale must be (lo, hi) with 0 < lo <= hi, got {self.lsj_scale!r}")
        if not 0 <= self.lsj_pad_value <= 255:
            raise ValueError(f"augment.lsj_pad_value must be in 0..255, got {self.lsj_pad_value!r}")
        if not 0.0 <= self.flip <= 1.0:
            raise ValueError(f"augment.flip must be a probability in [0, 1], got {self.flip!r}")
        if self.min_box_size < 0:
            raise ValueError(f"augment.min_box_size must be >= 0, got {self.min_box_size!r}")


# Small-image variant for the CPU demo / tests (synthetic images of ~160-320 px).
TINY_AUGMENT = AugmentConfig(
    scales=(160, 192, 224, 256), max_size=400, crop_scales=(160, 200, 240), crop_size=(128, 240), lsj_size=256
)


@dataclass(frozen=True)
class DataConfig:
    """Shards -> Ray Data -> per-worker batches."""

    shards: str = ""
    """Shard root URI (`<shards>/manifest.json`, `<shards>/<split>/part-*.parquet`); any storage URI."""
    train_split: str = "train"
    val_split: str = "val"
    batch_size: int = 2
    """Images per training worker and step (the authors: 2 per GPU, 16 in total)."""
    num_workers: int = 2
    """CPU tasks that read + decode + augment at once, for the whole run: each of W training workers streams its
    slice with num_workers // W of them (at least 1); evaluation and prediction use num_workers (or torch
    DataLoader workers)."""
    map_batch_size: int = 8
    """Rows per block a decode task yields (the first images of a row group reach training after this many)."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    eval_size: tuple[int, int] = (800, 1333)
    """Eval keep-ratio resize (shorter side, longest-side limit) for the detr policy."""
    size_divisor: int = 1
    """Pad each batch to a multiple of this (the authors: 1; some recipes 32)."""
    seed: int = 0
    """Run seed; augmentation derives from (seed, epoch, image_id), the order of row groups and of the rows inside
    each from (seed, epoch) (`pipeline/data/plan.py`; it replaces the earlier local shuffle buffer)."""
    drop_crowd: bool = True
    """Drop iscrowd=1 boxes from training targets (the authors keep them out as `gt_bboxes_ignore`, which the
    DETR-style heads never read). Eval targets keep them, flagged by `iscrowd`."""
    prefetch_batches: int = 2
    """Batches each training worker prefetches from Ray Data."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "num_workers", "map_batch_size", "size_divisor", "prefetch_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.seed < 0:
            raise ValueError(f"data.seed must be >= 0, got {self.seed!r}")
        short, long = self.eval_size
        if not 1 <= short <= long:
            raise ValueError(f"data.eval_size must be (shorter, longest) with 1 <= shorter <= longest, "
                             f"got {self.eval_size!r}")
