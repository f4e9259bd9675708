"""Exponential moving average of the model weights, on torch's own AveragedModel."""

from __future__ import annotations

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def build_ema(model: nn.Module, decay: float) -> AveragedModel:
    """EMA copy of `model` (parameters and buffers): ema = decay * ema + (1 - decay) * weights after each step.

    Matches mmdet's ExpMomentumEMA at momentum = 1 - decay (without its warm-up of the momentum)."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def ema_checkpoint(ema: AveragedModel) -> tuple[dict, int]:
    """What a checkpoint must hold to continue `ema` exactly: the averaged weights (`ema.pt`, a plain model state
    dict that evaluation loads) and the averaging count (`trainer_state.json` key `ema_n_averaged`)."""
    return ema.module.state_dict(), int(ema.n_averaged)


def restore_ema(ema: AveragedModel, module_state: dict, n_averaged: int) -> None:
    """Inverse of `ema_checkpoint`. The count matters: AveragedModel copies the raw weights over the average when
    `n_averaged == 0`, so a resume that left it at 0 would restart the average from the current weights."""
    ema.module.load_state_dict(module_state)
    ema.n_averaged.fill_(int(n_averaged))
