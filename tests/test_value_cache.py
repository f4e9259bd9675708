"""The decoder's value cache: the aux query groups' decoder passes reuse the main pass's projected memory, so a
K-head training step projects the memory once per decoder layer, with the same losses and gradients as
projecting it in every pass."""

from __future__ import annotations

import torch
from test_aux_head_table import _batch, tiny

from pipeline.models import build_model


def _step(model, cache: bool):
    counts = {"value_proj": 0}

    def count(*_):
        counts["value_proj"] += 1

    hooks = [layer.cross_attn.value_proj.register_forward_hook(count) for layer in model.transformer.decoder.layers]
    original = model.transformer.decode
    if not cache:  # the pre-cache behaviour: every pass projects the memory itself
        def decode(query, reference_boxes, enc, reg_branches, attn_mask=None, query_pos=None):
            enc.value_cache = None  # type: ignore[assignment]
            return original.__func__(model.transformer, query, reference_boxes, enc, reg_branches, attn_mask,
                                     query_pos)  # fmt: skip
        model.transformer.decode = decode
    model.zero_grad()
    losses = model(*_batch())
    sum(v for k, v in losses.items() if "loss" in k).backward()
    for h in hooks:
        h.remove()
    model.transformer.decode = original
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return losses, grads, counts["value_proj"]


def test_aux_passes_reuse_the_projected_memory_same_losses_and_gradients():
    torch.manual_seed(0)
    model = build_model(tiny("[atss,paa]")).train()
    layers = model.transformer.decoder.num_layers
    torch.manual_seed(1)
    cached, g_cached, n_cached = _step(model, cache=True)
    torch.manual_seed(1)
    plain, g_plain, n_plain = _step(model, cache=False)
    assert n_plain == 3 * layers and n_cached == layers  # main + 2 aux passes vs one projection per layer
    assert cached.keys() == plain.keys()
    for k in plain:
        assert torch.equal(cached[k], plain[k]), k  # the forward is the same computation
    assert g_cached.keys() == g_plain.keys()
    for n in g_plain:  # gradients add before the projection's backward instead of after: float rounding only
        torch.testing.assert_close(g_cached[n], g_plain[n], rtol=1e-4, atol=1e-6, msg=n)
