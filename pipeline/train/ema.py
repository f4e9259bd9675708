"""Exponential moving average of the model weights, on torch's own AveragedModel."""

from __future__ import annotations

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def build_ema(model: nn.Module, decay: float) -> AveragedModel:
    """EMA copy of `model` (parameters and buffers): ema = decay * ema + (1 - decay) * weights after each step.

    Matches mmdet's ExpMomentumEMA at momentum = 1 - decay (without its warm-up of the momentum)."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
