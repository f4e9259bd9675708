"""Deformable attention: gather kernel == per-level grid_sample reference; mmcv-equivalent module."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.models.layers import deform_attn
from pipeline.models.layers.deform_attn import (
    MultiScaleDeformableAttention,
    deform_attn_impl,
    multi_scale_deformable_attn,
    multi_scale_deformable_attn_reference,
)

ODD_SHAPES = torch.tensor([[3, 5], [2, 3], [1, 1]])  # (h, w) per level


def _inputs(shapes: torch.Tensor, B: int = 2, Q: int = 7, nH: int = 3, Dh: int = 4, P: int = 2,
            lo: float = -0.3, hi: float = 1.3, dtype: torch.dtype = torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    S, L = int(shapes.prod(1).sum()), len(shapes)
    value = torch.randn(B, S, nH, Dh, generator=g, dtype=dtype)
    loc = torch.rand(B, Q, nH, L, P, 2, generator=g, dtype=dtype) * (hi - lo) + lo
    weights = torch.rand(B, Q, nH, L, P, generator=g, dtype=dtype)
    return value, loc, weights


def _fwd_bwd(fn, shapes, value, loc, weights, grad):
    inputs = [t.detach().clone().requires_grad_() for t in (value, loc, weights)]
    out = fn(inputs[0], shapes, inputs[1], inputs[2])
    grads = torch.autograd.grad(out, inputs, grad)
    return out.detach(), grads


def _assert_kernel_matches(shapes, value, loc, weights, atol=1e-10):
    grad = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3], dtype=value.dtype)
    out, grads = _fwd_bwd(multi_scale_deformable_attn, shapes, value, loc, weights, grad)
    ref_out, ref_grads = _fwd_bwd(multi_scale_deformable_attn_reference, shapes, value, loc, weights, grad)
    assert out.shape == (value.shape[0], loc.shape[1], value.shape[2] * value.shape[3])
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=0)
    for name, g, r in zip(("value", "sampling_locations", "attention_weights"), grads, ref_grads):
        torch.testing.assert_close(g, r, atol=atol, rtol=0, msg=lambda m, n=name: f"grad {n}: {m}")


def test_kernel_matches_reference_odd_shapes_points_outside():
    value, loc, weights = _inputs(ODD_SHAPES)
    assert (loc < 0).any() and (loc > 1).any()  # some points (partly) outside every level
    _assert_kernel_matches(ODD_SHAPES, value, loc, weights)


def test_kernel_matches_reference_far_outside_and_single_level():
    value, loc, weights = _inputs(ODD_SHAPES, lo=-5.0, hi=6.0, seed=1)
    _assert_kernel_matches(ODD_SHAPES, value, loc, weights)
    one = torch.tensor([[4, 3]])
    value, loc, weights = _inputs(one, B=1, Q=5, nH=1, Dh=2, P=3, seed=2)
    _assert_kernel_matches(one, value, loc, weights)


def test_kernel_matches_reference_on_exact_pixel_centres_and_borders():
    # Power-of-two sizes make x*w - 0.5 exact, so both kernels see the same integer corner positions,
    # including the one-sided derivatives at borders (-1, 0, w-1, w in pixel units).
    shapes = torch.tensor([[2, 4], [1, 2], [1, 1]])
    value, _, weights = _inputs(shapes, B=1, Q=6, nH=2, Dh=3, P=2, seed=3)
    pix = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0, 3.5, 4.0, 4.5], dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    picks = pix[torch.randint(len(pix), (1, 6, 2, 3, 2, 2), generator=g)]
    wh = shapes.flip(-1).to(torch.float64).view(1, 1, 1, 3, 1, 2)
    loc = (picks + 0.5) / wh  # pixel coordinate p on every level
    _assert_kernel_matches(shapes, value, loc, weights)


def test_kernel_padded_level_zero_tokens():
    # Level 0 is "padded": its right two columns are zeros (like masked value tokens). Points landing there
    # must match the reference and the gradient into those tokens must still flow.
    value, loc, weights = _inputs(ODD_SHAPES, seed=5)
    lvl0 = value[:, :15].view(2, 3, 5, 3, 4)
    lvl0[:, :, 3:] = 0
    loc[..., 0, :, 0] = 0.9  # x near the right border of level 0
    _assert_kernel_matches(ODD_SHAPES, value, loc, weights)


def test_kernel_float32_and_noncontiguous_inputs():
    value, loc, weights = _inputs(ODD_SHAPES, dtype=torch.float32, seed=6)
    value_nc = value.transpose(2, 3).contiguous().transpose(2, 3)  # same numbers, other strides
    out = multi_scale_deformable_attn(value_nc, ODD_SHAPES, loc, weights)
    ref = multi_scale_deformable_attn_reference(value, ODD_SHAPES, loc, weights)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_kernel_float32_grads_and_int64_rows(monkeypatch):
    value, loc, weights = _inputs(ODD_SHAPES, dtype=torch.float32, seed=9)
    grad = torch.randn(2, 7, 12)
    ref_out, ref_grads = _fwd_bwd(multi_scale_deformable_attn_reference, ODD_SHAPES, value, loc, weights,
                                  grad)
    for limit in (2**31, 1):  # int32 corner rows, then the int64 path used for huge maps
        monkeypatch.setattr(deform_attn, "_INT32_ROWS_LIMIT", limit)
        out, grads = _fwd_bwd(multi_scale_deformable_attn, ODD_SHAPES, value, loc, weights, grad)
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("queries, path", [(7, "_scatter_by_cell"), (2, "_scatter_to_rows")])
def test_value_gradient_by_cell_and_by_row(monkeypatch, queries, path):
    # Points outnumber value rows (N*J = 2*7*3*6 = 252 >= R = 2*22*3 = 132): the value gradient sums points per
    # top-left cell; with 2 queries (72 < 132) it sums corners per row. Both must give the reference, with
    # points inside, on borders and far outside (whose zero-weight corners must not reach any real row).
    calls: list[str] = []
    for name in ("_scatter_by_cell", "_scatter_to_rows"):
        fn = getattr(deform_attn, name)
        monkeypatch.setattr(deform_attn, name, lambda *a, _fn=fn, _name=name: calls.append(_name) or _fn(*a))
    value, loc, weights = _inputs(ODD_SHAPES, Q=queries, lo=-2.5, hi=3.5, seed=12)
    loc[:, :, :, 1, 0] = torch.tensor([-7.0, 9.0], dtype=loc.dtype)  # one point per bag far outside level 1
    _assert_kernel_matches(ODD_SHAPES, value, loc, weights)
    assert calls == [path]


def test_group_by_key_same_on_both_device_paths():
    # CPU groups with bincount, CUDA with searchsorted (no host read); both must give the same order and starts,
    # including keys with no entries (first, last and in between).
    keys = torch.tensor([5, 2, 2, 7, 0, 5, 5, 2, 9], dtype=torch.int32)
    expected_first = torch.tensor([0, 1, 1, 4, 4, 4, 7, 7, 8, 8, 9, 9])  # entries with a smaller key
    for host_sizes in (True, False):
        perm, bag, first = deform_attn._group_by_key(keys, 12, 3, host_sizes=host_sizes)
        assert keys[perm].tolist() == sorted(keys.tolist())
        assert perm[keys[perm] == 5].tolist() == [0, 5, 6]  # stable
        assert first.tolist() == expected_first.tolist()
        assert bag.tolist() == (perm // 3).tolist() and bag.dtype == first.dtype == keys.dtype


def test_kernel_gradcheck_float64():
    value, loc, weights = _inputs(ODD_SHAPES, B=1, Q=3, nH=2, Dh=2, P=2, seed=7)
    inputs = tuple(t.requires_grad_() for t in (value, loc, weights))
    assert torch.autograd.gradcheck(lambda v, s, a: multi_scale_deformable_attn(v, ODD_SHAPES, s, a), inputs)


def test_kernel_only_some_inputs_need_grad():
    value, loc, weights = _inputs(ODD_SHAPES, seed=8)
    loc.requires_grad_()
    out = multi_scale_deformable_attn(value, ODD_SHAPES, loc, weights)
    (g,) = torch.autograd.grad(out.sum(), loc)
    ref = multi_scale_deformable_attn_reference(value, ODD_SHAPES, loc, weights)
    (r,) = torch.autograd.grad(ref.sum(), loc)
    torch.testing.assert_close(g, r, atol=1e-10, rtol=0)


def test_kernel_zero_queries_and_bad_shapes():
    value, loc, weights = _inputs(ODD_SHAPES)
    assert multi_scale_deformable_attn(value, ODD_SHAPES, loc[:, :0], weights[:, :0]).shape == (2, 0, 12)
    with pytest.raises(ValueError, match="cover 22 tokens but value has S=21"):
        multi_scale_deformable_attn(value[:, :-1], ODD_SHAPES, loc, weights)
    with pytest.raises(ValueError, match="attention_weights"):
        multi_scale_deformable_attn(value, ODD_SHAPES, loc, weights[..., :1])


def test_kernel_saves_only_its_inputs():
    value, loc, weights = (t.requires_grad_() for t in _inputs(ODD_SHAPES, dtype=torch.float32, seed=10))
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = multi_scale_deformable_attn(value, ODD_SHAPES, loc, weights, impl="pytorch")
    allowed = {value.data_ptr(), loc.data_ptr(), weights.data_ptr(), ODD_SHAPES.data_ptr()}
    assert saved and all(t.data_ptr() in allowed for t in saved), [tuple(t.shape) for t in saved]
    # ... and backward still gives the reference gradients from them.
    grads = torch.autograd.grad(out.square().sum(), (value, loc, weights))
    ref = multi_scale_deformable_attn_reference(value, ODD_SHAPES, loc, weights)
    for g, r in zip(grads, torch.autograd.grad(ref.square().sum(), (value, loc, weights))):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


def test_kernel_bf16_autocast_computes_in_float32():
    # As in the model under autocast: bf16 value (value_proj output), fp32 locations and weights. The output
    # comes back in bf16, each gradient in its input's dtype; location / weight gradients carry float32
    # error only (the previous kernel formed them from bf16 dot products: ~1e-2 relative error).
    value, loc, weights = _inputs(ODD_SHAPES, B=2, Q=30, nH=2, Dh=32, P=4, seed=11)
    v16, l32, w32 = value.bfloat16(), loc.float(), weights.float()
    grad = torch.randn(2, 30, 64, dtype=torch.float64).bfloat16()
    inputs = [t.clone().requires_grad_() for t in (v16, l32, w32)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = multi_scale_deformable_attn(inputs[0], ODD_SHAPES, inputs[1], inputs[2], impl="pytorch")
    grads = torch.autograd.grad(out, inputs, grad)
    assert out.dtype == torch.bfloat16
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32]
    ref_out, ref_grads = _fwd_bwd(multi_scale_deformable_attn_reference, ODD_SHAPES, v16.double(), l32.double(),
                                  w32.double(), grad.double())
    torch.testing.assert_close(out.double(), ref_out, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(grads[0].double(), ref_grads[0], atol=1e-2, rtol=1e-2)
    for g, r in zip(grads[1:], ref_grads[1:]):
        torch.testing.assert_close(g.double(), r, atol=1e-4, rtol=1e-4)


def test_kernel_with_spatial_hw_never_reads_tensors_on_the_host():
    # Meta tensors have no data: any host read (.tolist(), int(), bincount's size) raises. With the level sizes
    # as Python ints the forward and backward run on meta, i.e. no host sync per call on CUDA either.
    hw = ((3, 5), (2, 3), (1, 1))
    shapes = torch.tensor(hw, device="meta")
    value, loc, weights = (t.to("meta").requires_grad_() for t in _inputs(ODD_SHAPES, dtype=torch.float32))
    out = multi_scale_deformable_attn(value, shapes, loc, weights, spatial_hw=hw, impl="pytorch")
    grads = torch.autograd.grad(out, (value, loc, weights), torch.ones_like(out))
    assert [tuple(g.shape) for g in grads] == [tuple(t.shape) for t in (value, loc, weights)]
    with pytest.raises(Exception, match="meta"):  # without them the sizes are read back: the test can fail
        multi_scale_deformable_attn(value, shapes, loc, weights, impl="pytorch")


def test_kernel_spatial_hw_checked():
    value, loc, weights = _inputs(ODD_SHAPES)
    with pytest.raises(ValueError, match="spatial_hw must be 3 positive"):
        multi_scale_deformable_attn(value, ODD_SHAPES, loc, weights, spatial_hw=[(3, 5), (2, 3)])
    with pytest.raises(ValueError, match="cover 23 tokens but value has S=22"):
        multi_scale_deformable_attn(value, ODD_SHAPES, loc, weights, spatial_hw=[(3, 5), (2, 3), (1, 2)])


def test_impl_switch_for_export():
    value, loc, weights = (t.requires_grad_() for t in _inputs(ODD_SHAPES, seed=12))

    def kernel_of(**kw):
        return multi_scale_deformable_attn(value, ODD_SHAPES, loc, weights, **kw).grad_fn.name()

    assert kernel_of() == "_MSDeformAttnFunctionBackward"  # auto on CPU: the PyTorch kernel
    with deform_attn_impl("reference"):
        assert kernel_of() != "_MSDeformAttnFunctionBackward"  # grid_sample graph (exportable)
        assert kernel_of(impl="pytorch") == "_MSDeformAttnFunctionBackward"  # the argument wins
    assert kernel_of() == "_MSDeformAttnFunctionBackward"  # the context is reset on exit
    assert kernel_of(impl="reference") != "_MSDeformAttnFunctionBackward"
    with pytest.raises(ValueError, match="must be one of"), deform_attn_impl("cuda"):
        pass
    with pytest.raises(ValueError, match="must be one of"):
        kernel_of(impl="fast")


# ----------------------------------------------------------------------------------------------- module

C, NH, L, P = 16, 4, 3, 2


def _module_inputs(B=2, Q=5, seed=0, ref_dim=2):
    g = torch.Generator().manual_seed(seed)
    S = int(ODD_SHAPES.prod(1).sum())
    query = torch.randn(B, Q, C, generator=g)
    value = torch.randn(B, S, C, generator=g)
    ref = torch.rand(B, Q, L, ref_dim, generator=g)
    if ref_dim == 4:
        ref[..., 2:] = ref[..., 2:] * 0.5 + 0.05
    return query, value, ref


def _randomised_module(seed=0):
    torch.manual_seed(seed)
    m = MultiScaleDeformableAttention(embed_dims=C, num_heads=NH, num_levels=L, num_points=P)
    with torch.no_grad():  # non-zero offsets / logits so every code path matters
        m.sampling_offsets.weight.normal_(0, 0.3)
        m.attention_weights.weight.normal_(0, 0.3)
        m.attention_weights.bias.normal_(0, 0.3)
    return m


def test_module_init_matches_mmcv():
    m = MultiScaleDeformableAttention(embed_dims=32, num_heads=8, num_levels=2, num_points=3)
    assert (m.sampling_offsets.weight == 0).all()
    bias = m.sampling_offsets.bias.view(8, 2, 3, 2)
    # Head 0 points along +x, head 2 along +y, head 1 diagonally (normalised by the max |coord|: (1, 1)).
    torch.testing.assert_close(bias[0, 0, :, :], torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]))
    torch.testing.assert_close(bias[1, 1, 1], torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(bias[2, 0, 2], torch.tensor([3 * math.cos(math.pi / 2), 3.0]))
    torch.testing.assert_close(bias[5, 0, 0], torch.tensor([-1.0, -1.0]))
    assert torch.equal(bias[:, 0], bias[:, 1])  # repeated over levels
    assert (m.attention_weights.weight == 0).all() and (m.attention_weights.bias == 0).all()
    for proj in (m.value_proj, m.output_proj):
        assert (proj.bias == 0).all()
        bound = math.sqrt(6 / (32 + 32))  # xavier_uniform, gain 1
        assert proj.weight.abs().max() <= bound and proj.weight.std() > bound / 3


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_matches_hand_computation(ref_dim):
    m = _randomised_module()
    query, value, ref = _module_inputs(ref_dim=ref_dim)
    pos = torch.randn_like(query)
    out = m(query, ref, value, ODD_SHAPES, query_pos=pos)
    assert out.shape == query.shape
    # Independent re-derivation with the reference kernel.
    B, Q, _ = query.shape
    q = query + pos
    v = m.value_proj(value).view(B, -1, NH, C // NH)
    off = m.sampling_offsets(q).view(B, Q, NH, L, P, 2)
    w = m.attention_weights(q).view(B, Q, NH, L * P).softmax(-1).view(B, Q, NH, L, P)
    if ref_dim == 2:
        wh = ODD_SHAPES.flip(-1).float()  # (w, h) per level
        loc = ref[:, :, None, :, None, :] + off / wh[None, None, None, :, None, :]
    else:
        loc = ref[:, :, None, :, None, :2] + off / P * ref[:, :, None, :, None, 2:] * 0.5
    expected = m.output_proj(multi_scale_deformable_attn_reference(v, ODD_SHAPES, loc, w)) + query
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_module_residual_and_identity():
    m = _randomised_module()
    query, value, ref = _module_inputs()
    with torch.no_grad():
        m.output_proj.weight.zero_()
    identity = torch.randn_like(query)
    pos = torch.randn_like(query)
    torch.testing.assert_close(m(query, ref, value, ODD_SHAPES, query_pos=pos), query)  # identity = query
    torch.testing.assert_close(m(query, ref, value, ODD_SHAPES, identity=identity), identity)


def test_module_padding_mask_hides_padded_tokens():
    m = _randomised_module()
    query, value, ref = _module_inputs()
    mask = torch.zeros(2, value.shape[1], dtype=torch.bool)
    mask[0, 10:15] = True  # last row of level 0 in image 0
    mask[1, 15:] = True  # levels 1 and 2 of image 1
    out = m(query, ref, value, ODD_SHAPES, value_padding_mask=mask)
    changed = value.clone()
    changed[mask] = torch.randn(int(mask.sum()), C) * 100
    torch.testing.assert_close(m(query, ref, changed, ODD_SHAPES, value_padding_mask=mask), out)
    # Without the mask the same change does move the output (the test can fail).
    assert not torch.allclose(m(query, ref, changed, ODD_SHAPES), m(query, ref, value, ODD_SHAPES))


def test_module_2d_and_4d_references_agree_when_boxes_match_level_size():
    # 4-d: loc = xy + off / P * wh * 0.5; 2-d: loc = xy + off / (w_l, h_l). Equal when wh = 2P / (w_l, h_l).
    m = _randomised_module()
    query, value, ref2 = _module_inputs()
    wh = 2 * P / ODD_SHAPES.flip(-1).float()  # (L, 2)
    ref4 = torch.cat([ref2, wh.expand(2, 5, L, 2)], -1)
    torch.testing.assert_close(m(query, ref4, value, ODD_SHAPES), m(query, ref2, value, ODD_SHAPES))
    with pytest.raises(ValueError, match="last dim must be 2 or 4"):
        m(query, ref2[..., :1], value, ODD_SHAPES)


def test_module_backward_reaches_every_parameter():
    m = _randomised_module()
    query, value, ref = _module_inputs(ref_dim=4)
    query.requires_grad_()
    m(query, ref, value, ODD_SHAPES, query_pos=torch.randn_like(query)).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert query.grad is not None
