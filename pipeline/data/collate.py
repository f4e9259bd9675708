"""Augmented samples -> one padded, normalised batch on a device.

    batch = collate(images, targets, size_divisor=1, device="cuda")
    losses = model(batch.images, batch.targets)   # with batch.masks as the padding mask

The authors' convention: normalise with the ImageNet mean/std, then pad with 0 at the bottom/right (mmdet
Normalize -> Pad -> collate). The uint8 pixels travel to the device (4x fewer bytes than float32) and are
normalised there; padded pixels are then set to 0, the same as padding normalised images with 0.
Targets stay a list of per-image dicts moved one by one (Ray's `iter_torch_batches` would concatenate nested
tensor lists).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD


@dataclass
class Batch:
    """images: (B, 3, H, W) float32 normalised, 0 in the padding;  masks: (B, H, W) bool, True = padding;
    targets: B dicts (see `pipeline.data.transforms.to_target`): boxes (N, 4) cxcywh normalised by the
    unpadded image size `size`, labels (N,) int64, iscrowd, image_id, size, orig_size, scale_factor."""

    images: torch.Tensor
    masks: torch.Tensor
    targets: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.targets)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The batch on `device` (tensors inside the target dicts too)."""
        return Batch(
            images=self.images.to(device, non_blocking=non_blocking),
            masks=self.masks.to(device, non_blocking=non_blocking),
            targets=[move_target(t, device, non_blocking) for t in self.targets],
        )


def move_target(target: dict[str, Any], device: torch.device | str,
                non_blocking: bool = False) -> dict[str, Any]:
    """A copy of `target` with every tensor value on `device` (other values unchanged)."""
    return {k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
            for k, v in target.items()}


def padded_shape(sizes: Sequence[tuple[int, int]], size_divisor: int = 1) -> tuple[int, int]:
    """(H, W): the largest h and w of `sizes`, rounded up to a multiple of `size_divisor`."""
    if not sizes:
        raise ValueError("cannot collate an empty batch")
    height = max(h for h, _ in sizes)
    width = max(w for _, w in sizes)
    div = int(size_divisor)
    return -(-height // div) * div, -(-width // div) * div


def normalize_(images: torch.Tensor) -> torch.Tensor:
    """In place: (B, 3, H, W) float pixels in 0..255 -> ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return images.sub_(mean).div_(std)


def collate(images: Sequence[np.ndarray | torch.Tensor], targets: Sequence[dict[str, Any]], *,
            size_divisor: int = 1, device: torch.device | str | None = None, non_blocking: bool = False
            ) -> Batch:
    """Pad uint8 images (3, h_i, w_i) to (B, 3, H, W), build the pixel mask, normalise, move to `device`.

    H, W = the largest h, w rounded up to `size_divisor`; masks[i, :h_i, :w_i] = False, True elsewhere.
    """
    if len(images) != len(targets):
        raise ValueError(f"collate got {len(images)} images and {len(targets)} targets; expected equal")
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    height, width = padded_shape(sizes, size_divisor)
    pixels = np.zeros((len(images), 3, height, width), dtype=np.uint8)
    masks = np.ones((len(images), height, width), dtype=bool)
    for i, (im, (h, w)) in enumerate(zip(images, sizes)):
        pixels[i, :, :h, :w] = np.asarray(im)
        masks[i, :h, :w] = False
    device = torch.device("cpu") if device is None else torch.device(device)
    images_t = torch.from_numpy(pixels).to(device, non_blocking=non_blocking).to(torch.float32)
    masks_t = torch.from_numpy(masks).to(device, non_blocking=non_blocking)
    normalize_(images_t).masked_fill_(masks_t.unsqueeze(1), 0.0)
    return Batch(images=images_t, masks=masks_t,
                 targets=[move_target(t, device, non_blocking) for t in targets])


def collate_samples(samples: Sequence[tuple[torch.Tensor, dict[str, Any]]], size_divisor: int = 1) -> Batch:
    """`collate_fn` for a torch DataLoader over `ShardDataset`: [(image, target), ...] -> CPU Batch."""
    images, targets = zip(*samples) if samples else ((), ())
    return collate(list(images), list(targets), size_divisor=size_divisor)
