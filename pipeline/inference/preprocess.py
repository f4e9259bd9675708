"""Image -> network input, exactly as evaluation does it (the eval transform of the training config).

    pre = PreprocessConfig.from_data(job.data)       # augment policy, eval_size, size_divisor
    image, target = pre.prepare(decode_image_bytes(data), image_id=7)
    batch = collate([image], [target], size_divisor=pre.size_divisor)
    dets = model(batch.images, batch.masks, batch.targets)   # boxes xyxy in source pixels (orig_size)
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any

import torch
import torchvision
from torchvision import tv_tensors
from torchvision.io import ImageReadMode

from pipeline.data.config import AugmentConfig, DataConfig
from pipeline.data.transforms import DetectionTransform, build_transforms, to_target


class BadImage(ValueError):
    """An input that cannot be turned into an image (unreadable bytes, missing file)."""


@dataclass(frozen=True)
class PreprocessConfig:
    """The eval-time part of `DataConfig`: what turns a source image into the network input."""

    augment: AugmentConfig = field(default_factory=AugmentConfig)
    eval_size: tuple[int, int] = (800, 1333)
    size_divisor: int = 1

    @classmethod
    def from_data(cls, data: DataConfig) -> PreprocessConfig:
        return cls(augment=data.augment, eval_size=tuple(data.eval_size), size_divisor=data.size_divisor)

    def to_json(self) -> dict[str, Any]:
        from pipeline.config import to_dict

        return to_dict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PreprocessConfig:
        from pipeline.config import from_dict

        return from_dict(cls, data)

    def transform(self) -> DetectionTransform:
        return _eval_transform(self.augment, tuple(self.eval_size))

    def prepare(self, image: torch.Tensor, image_id: int = 0) -> tuple[torch.Tensor, dict[str, Any]]:
        """(3, H, W) uint8 RGB -> (network image (3, h, w) uint8, target dict with size, orig_size,
        scale_factor and no boxes), see `pipeline.data.transforms.to_target`."""
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise BadImage(f"image {image_id}: expected a (3, H, W) uint8 tensor, got {tuple(image.shape)} "
                           f"{image.dtype}")
        h, w = int(image.shape[1]), int(image.shape[2])
        sample = {
            "image": tv_tensors.Image(image),
            "boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(h, w)),
            "labels": torch.zeros(0, dtype=torch.int64), "iscrowd": torch.zeros(0, dtype=torch.int64),
            "image_id": int(image_id), "orig_size": (h, w),
        }
        return to_target(self.transform()(sample))

    def replace(self, **changes: Any) -> PreprocessConfig:
        return dataclasses.replace(self, **changes)


@functools.lru_cache(maxsize=4)
def _eval_transform(aug: AugmentConfig, eval_size: tuple[int, int]) -> DetectionTransform:
    return build_transforms(aug, train=False, eval_size=eval_size)


def decode_image_bytes(data: bytes, name: str = "") -> torch.Tensor:
    """Encoded JPEG / PNG / GIF / WebP bytes -> (3, H, W) uint8 RGB; BadImage naming `name` otherwise."""
    if not data:
        raise BadImage(f"{name or 'image'}: empty file")
    try:
        return torchvision.io.decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                           mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadImage(f"{name or 'image'}: cannot decode ({first})") from e
