"""Triton deformable-attention kernel == grid_sample reference, on CPU through Triton's interpreter.

TRITON_INTERPRET=1 must be set before triton is imported, so the checks run in a subprocess (the variable
does not leak into other tests): the test runs this file as a script. Shapes are tiny; a few seconds.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NUM_CHECKS = 5


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="triton is not installed: the Triton kernel cannot be tested (CUDA uses the PyTorch "
                           "kernel then)")
def test_triton_kernel_matches_reference_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{NUM_CHECKS} checks passed" in proc.stdout, proc.stdout


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("value_dtype", ["bf16", "fp32"])
def test_triton_kernels_compile_for_hopper_without_a_gpu(value_dtype):
    # The interpreter accepts code the compiler rejects: compile both kernels to a cubin for sm_90 with
    # triton's bundled ptxas (no GPU needed) and check that nothing spills to local memory.
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pipeline.models.layers import deform_attn_triton as kernels

    ints = {name: "i32" for name in ("N", "Q", "S", "nH", "Dh", "L", "P")}
    blocks = {"BLOCK_N": "constexpr", "BLOCK_D": "constexpr", "USE_FP64": "constexpr"}
    inputs = {"value_ptr": f"*{value_dtype}", "shapes_ptr": "*i64", "starts_ptr": "*i64", "loc_ptr": "*fp32",
              "attn_ptr": "*fp32"}
    fwd = {**inputs, "out_ptr": f"*{value_dtype}", **ints, **blocks}
    bwd = {**inputs, "grad_out_ptr": f"*{value_dtype}", "grad_value_ptr": "*fp32", "grad_loc_ptr": "*fp32",
           "grad_attn_ptr": "*fp32", **ints, **blocks}
    for fn, signature, block_n in ((kernels._fwd_kernel, fwd, kernels.BLOCK_N_FWD),
                                   (kernels._bwd_kernel, bwd, kernels.BLOCK_N_BWD)):
        source = ASTSource(fn, signature, constexprs={"BLOCK_N": block_n, "BLOCK_D": 32, "USE_FP64": False})
        compiled = triton_compile(source, target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"], fn
        assert ".local" not in compiled.asm["ptx"], f"{fn} spills to local memory"


# ------------------------------------------------------------------------------ run in the subprocess

def _inputs(shapes, B=2, Q=7, nH=3, Dh=4, P=2, lo=-0.3, hi=1.3, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    S, L = int(shapes.prod(1).sum()), len(shapes)
    value = torch.randn(B, S, nH, Dh, generator=g, dtype=torch.float64)
    loc = torch.rand(B, Q, nH, L, P, 2, generator=g, dtype=torch.float64) * (hi - lo) + lo
    weights = torch.rand(B, Q, nH, L, P, generator=g, dtype=torch.float64)
    grad = torch.randn(B, Q, nH * Dh, generator=g, dtype=torch.float64)
    return value, loc, weights, grad


def _fwd_bwd(impl, shapes, value, loc, weights, grad):
    import torch

    from pipeline.models.layers.deform_attn import multi_scale_deformable_attn

    inputs = [t.detach().clone().requires_grad_() for t in (value, loc, weights)]
    hw = [tuple(p) for p in shapes.tolist()]
    out = multi_scale_deformable_attn(inputs[0], shapes, inputs[1], inputs[2], spatial_hw=hw, impl=impl)
    grads = torch.autograd.grad(out, inputs, grad.to(out.dtype))
    return out.detach(), grads


def _assert_matches(shapes, value, loc, weights, grad, atol=1e-12):
    import torch

    out, grads = _fwd_bwd("triton", shapes, value, loc, weights, grad)
    ref, ref_grads = _fwd_bwd("reference", shapes, value, loc, weights, grad)
    torch.testing.assert_close(out, ref, atol=atol, rtol=0)
    for name, g, r in zip(("value", "sampling_locations", "attention_weights"), grads, ref_grads):
        torch.testing.assert_close(g, r, atol=atol, rtol=0, msg=lambda m, n=name: f"grad {n}: {m}")


def _interpreter_checks() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    import torch

    odd = torch.tensor([[3, 5], [2, 3], [1, 1]])
    passed = 0

    # 1. float64, odd level sizes, points partly and far outside every level: exact agreement.
    _assert_matches(odd, *_inputs(odd))
    _assert_matches(odd, *_inputs(odd, lo=-5.0, hi=6.0, seed=1))
    passed += 1

    # 2. Exact pixel centres and borders (power-of-two sizes make loc*w - 0.5 exact), one-sided derivatives.
    shapes = torch.tensor([[2, 4], [1, 2], [1, 1]])
    value, _, weights, grad = _inputs(shapes, B=1, Q=6, nH=2, Dh=3, seed=3)
    pix = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0, 3.5, 4.0, 4.5], dtype=torch.float64)
    picks = pix[torch.randint(len(pix), (1, 6, 2, 3, 2, 2), generator=torch.Generator().manual_seed(4))]
    loc = (picks + 0.5) / shapes.flip(-1).to(torch.float64).view(1, 1, 1, 3, 1, 2)
    _assert_matches(shapes, value, loc, weights, grad)
    passed += 1

    # 3. Mixed precision as under autocast (bf16 value, fp32 locations / weights, Dh not a power of two,
    # more bags than one program): output in bf16 and gradients with float32 accumulation, checked against
    # the float64 reference on the same numbers.
    value, loc, weights, grad = _inputs(odd, B=2, Q=40, nH=2, Dh=5, P=3, seed=5)
    v16, l32, w32, g16 = value.bfloat16(), loc.float(), weights.float(), grad.bfloat16()
    out, grads = _fwd_bwd("triton", odd, v16, l32, w32, g16)
    assert out.dtype == torch.bfloat16 and [g.dtype for g in grads] == [torch.bfloat16, torch.float32,
                                                                         torch.float32]
    ref, ref_grads = _fwd_bwd("reference", odd, v16.double(), l32.double(), w32.double(), g16.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=1e-2)  # bf16 rounding of the output
    torch.testing.assert_close(grads[0].double(), ref_grads[0], atol=2e-2, rtol=1e-2)
    for g, r in zip(grads[1:], ref_grads[1:]):  # fp32 accumulation: float32-level error, not bf16's
        torch.testing.assert_close(g.double(), r, atol=1e-4, rtol=1e-4)
    passed += 1

    # 4. Only the locations need a gradient; zero queries.
    value, loc, weights, grad = _inputs(odd, seed=6)
    from pipeline.models.layers.deform_attn import multi_scale_deformable_attn

    loc.requires_grad_()
    out = multi_scale_deformable_attn(value, odd, loc, weights, impl="triton")
    (g,) = torch.autograd.grad(out, loc, grad)
    _, ref_grads = _fwd_bwd("reference", odd, value, loc, weights, grad)
    torch.testing.assert_close(g, ref_grads[1], atol=1e-12, rtol=0)
    empty = multi_scale_deformable_attn(value, odd, loc[:, :0].detach(), weights[:, :0], impl="triton")
    assert empty.shape == (2, 0, 12)
    passed += 1

    # 5. The autograd function saves only its inputs (and the (L, 2) level shapes).
    saved: list[torch.Tensor] = []
    inputs = [t.detach().clone().requires_grad_() for t in (value, loc, weights)]
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        multi_scale_deformable_attn(inputs[0], odd, inputs[1], inputs[2], impl="triton")
    input_ptrs = {t.data_ptr() for t in inputs}
    extra = [tuple(t.shape) for t in saved if t.data_ptr() not in input_ptrs]
    assert extra == [(3, 2)], f"saved beyond the inputs: {extra}"
    passed += 1

    print(f"{passed} checks passed")


if __name__ == "__main__":
    _interpreter_checks()
