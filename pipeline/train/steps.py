"""One optimizer step of plain PyTorch, with no Ray in sight: forward under autocast, loss guard, backward with
gradient accumulation, clipping, AdamW, EMA. The per-worker loop (`loop.py`) drives it."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn


class NonFiniteLossError(RuntimeError):
    """A loss term is NaN or infinite; the message lists every term."""


def autocast_context(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU for amp in ("auto", "bf16"); fp32 elsewhere. The model computes its losses in fp32."""
    if device.type == "cuda" and amp in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and amp == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def nonfinite_message(losses: dict[str, torch.Tensor], step: int) -> str:
    terms = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
    return f"non-finite loss at step {step}: {terms}"


def check_finite(losses: dict[str, torch.Tensor], step: int) -> bool:
    """Raise NonFiniteLossError (every term in the message) unless every term is finite."""
    if bool(torch.isfinite(torch.stack([v.detach().float() for v in losses.values()])).all()):
        return True
    raise NonFiniteLossError(nonfinite_message(losses, step))


@dataclass
class StepStats:
    """Running sums between two log points.

    Loss terms stay on the device: each micro-step adds one stacked tensor (no host sync); `summary` copies the sums
    to the host once per log interval."""

    sums: dict[tuple[str, ...], torch.Tensor] = field(default_factory=dict)
    micro_batches: int = 0
    images: int = 0
    skipped_steps: int = 0
    data_wait_s: float = 0.0
    compute_s: float = 0.0

    def add(self, losses: dict[str, torch.Tensor], images: int) -> None:
        keys = tuple(losses)
        stacked = torch.stack([v.detach().float().reshape(()) for v in losses.values()])
        self.sums[keys] = self.sums[keys] + stacked if keys in self.sums else stacked
        self.micro_batches += 1
        self.images += images

    @property
    def loss_sums(self) -> dict[str, float]:
        """Per-term sums on the host (one device-to-host copy per distinct key set)."""
        out: dict[str, float] = {}
        for keys, sums in self.sums.items():
            for k, v in zip(keys, sums.cpu().tolist()):
                out[k] = out.get(k, 0.0) + v
        return out

    def summary(self, world_size: int) -> dict[str, float]:
        n = max(self.micro_batches, 1)
        loss_sums = self.loss_sums
        out = {f"train/{k}": v / n for k, v in loss_sums.items() if not k.endswith("acc")}
        out.update({f"train/{k}": v / n for k, v in loss_sums.items() if k.endswith("acc")})
        loss_keys = [k for k in loss_sums if "loss" in k]
        out["train/loss"] = sum(loss_sums[k] for k in loss_keys) / n
        wall = self.data_wait_s + self.compute_s
        out["train/images_per_s"] = self.images * world_size / wall if wall > 0 else 0.0
        out["train/data_wait_fraction"] = self.data_wait_s / wall if wall > 0 else 0.0
        out["train/skipped_steps"] = float(self.skipped_steps)
        return out


def backward_micro_batch(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    targets: list[dict],
    *,
    accum: int,
    device: torch.device,
    amp: str,
    step: int,
    nonfinite: str,
    no_sync: bool,
    poison: bool = False,
) -> dict[str, torch.Tensor] | None:
    """Forward + backward of one micro-batch; returns the loss terms, or None if skipped as non-finite.

    Non-finite consensus: the ranks agree (one all-reduce, `pipeline.dist.all_agree`) whether every rank's loss is
    finite. If one is not, *every* rank skips the micro-step together (nonfinite="skip") or raises ("raise"). A
    skipped step still runs backward on a zeroed loss so that DDP's gradient all-reduce happens on every rank alike
    (a rank that left it out would pair the next collective wrongly); the caller then drops the gradients.
    `poison` (a test knob, `CODETR_NONFINITE_AT`) turns this rank's loss terms into NaN after the forward."""
    from pipeline import dist as pcoll

    sync_ctx = model.no_sync() if (no_sync and hasattr(model, "no_sync")) else contextlib.nullcontext()
    with sync_ctx:
        with autocast_context(device, amp):
            losses = model(images, masks, targets)
        losses = {k: v.float() for k, v in losses.items()}  # fp32 losses, whatever the autocast dtype
        if poison:
            losses = {k: v * float("nan") for k, v in losses.items()}
        total = sum(v for k, v in losses.items() if "loss" in k)
        finite_here = torch.isfinite(torch.stack([v.detach() for v in losses.values()])).all()
        if pcoll.all_agree(finite_here):
            (total / accum).backward()
            return losses
        if nonfinite == "raise":
            if not bool(finite_here):
                raise NonFiniteLossError(nonfinite_message(losses, step))
            raise NonFiniteLossError(f"non-finite loss on another rank at step {step}")
        (torch.nan_to_num(total, nan=0.0, posinf=0.0, neginf=0.0) * 0.0).backward()  # keeps DDP in lockstep
    return None


def optimizer_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, clip_grad_norm: float, ema: nn.Module | None
) -> torch.Tensor:
    """Clip, step, zero grads, update the EMA. Returns the pre-clip gradient norm, a 0-dim tensor on the device
    (not read here: reading it would make every step wait for the device)."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, clip_grad_norm) if clip_grad_norm > 0 else torch.zeros(())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update_parameters(model.module if hasattr(model, "module") else model)
    return norm
