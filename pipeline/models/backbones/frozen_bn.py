"""Frozen BatchNorm and stage freezing for pretrained backbones [CO_DETR_SPEC 1.1 Backbone].

The authors' ResNet runs every BatchNorm with `requires_grad=False, norm_eval=True`: affine parameters and running
statistics never change, and the layer computes `(x - running_mean) / sqrt(running_var + eps) * weight + bias`
with eps 1e-5. torchvision's `FrozenBatchNorm2d` computes exactly that (its default eps is also 1e-5, and the
conversion below copies each layer's own eps). Its buffers keep the BatchNorm names (`weight`, `bias`,
`running_mean`, `running_var`) and it ignores `num_batches_tracked` on load, so checkpoints of a plain BatchNorm
network (torchvision, mmdet) load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

__all__ = ["FrozenBatchNorm2d", "convert_frozen_batchnorm", "freeze_module"]


def _frozen_from(bn: nn.BatchNorm2d | nn.SyncBatchNorm) -> nn.Module:
    """A FrozenBatchNorm2d carrying `bn`'s statistics, affine parameters and eps, on `bn`'s device."""
    frozen = FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
    ref = bn.running_mean if bn.running_mean is not None else bn.weight
    device = ref.device if ref is not None else torch.device("cpu")
    n = bn.num_features
    # Register fresh buffers rather than copying into the default ones: works on the `meta` device too.
    buffers = {
        "weight": bn.weight if bn.affine else torch.ones(n, device=device),
        "bias": bn.bias if bn.affine else torch.zeros(n, device=device),
        "running_mean": bn.running_mean if bn.running_mean is not None else torch.zeros(n, device=device),
        "running_var": bn.running_var if bn.running_var is not None else torch.ones(n, device=device),
    }
    for name, value in buffers.items():
        frozen.register_buffer(name, value.detach().clone().float())
    return frozen


def convert_frozen_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every `nn.BatchNorm2d` / `nn.SyncBatchNorm` inside `module` by a `FrozenBatchNorm2d`.

    Works in place on children and returns the (possibly replaced) root. timm's `BatchNormAct2d` (a BatchNorm2d
    with a fused activation) is converted by timm's own helper so that its activation is kept.
    """
    from timm.layers import BatchNormAct2d, freeze_batch_norm_2d

    if isinstance(module, BatchNormAct2d):
        return freeze_batch_norm_2d(module)
    if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        return _frozen_from(module)
    for name, child in module.named_children():
        new_child = convert_frozen_batchnorm(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def freeze_module(module: nn.Module) -> None:
    """No gradient for any parameter of `module`, and eval mode (BatchNorm statistics, dropout, drop-path)."""
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()
