"""EMA across a resume: an interrupted and resumed run ends with the same EMA weights as an uninterrupted one."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.train.ema import build_ema, ema_checkpoint, restore_ema


def _run(steps: int, model: nn.Module, opt: torch.optim.Optimizer, ema, data: torch.Tensor, start: int) -> None:
    for i in range(start, start + steps):
        loss = (model(data[i]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update_parameters(model)


def _fresh(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, opt, build_ema(model, decay=0.9)


def test_resumed_ema_equals_uninterrupted() -> None:
    data = torch.randn(6, 16, 4, generator=torch.Generator().manual_seed(1))
    model, opt, ema = _fresh()
    _run(6, model, opt, ema, data, 0)
    reference = ema.module.state_dict()

    model, opt, ema = _fresh()
    _run(3, model, opt, ema, data, 0)
    saved = ({k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict(), *ema_checkpoint(ema))
    assert saved[3] == 3

    def resume(n_averaged: int) -> dict[str, torch.Tensor]:
        model2, opt2, ema2 = _fresh(seed=123)  # a new process: other random init, as after a restart
        model2.load_state_dict(saved[0])
        opt2.load_state_dict(saved[1])
        restore_ema(ema2, saved[2], n_averaged)
        _run(3, model2, opt2, ema2, data, 3)
        return ema2.module.state_dict()

    resumed = resume(saved[3])
    for k, v in reference.items():
        torch.testing.assert_close(resumed[k], v, rtol=0, atol=1e-6, msg=f"EMA {k} differs after resume")
    # without the averaging count the first update after the resume copies the raw weights: detectably different
    reset = resume(0)
    assert max((reset[k].float() - v.float()).abs().max().item() for k, v in reference.items()) > 1e-3
