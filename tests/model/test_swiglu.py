"""The weighted SwiGLU's backward: the torch implementation against autograd, and the Triton kernel
(its CUDA implementation) against it under Triton's interpreter where Triton is installed."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3.model.swiglu import weighted_swiglu, weighted_swiglu_backward
from tests.conftest import needs_triton, run_under_triton_interpreter


def test_backward_is_autograd_of_the_weighted_product():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(9, 2 * 12, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.rand(9, 1, generator=gen, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(9, 12, generator=gen, dtype=torch.float64)
    gate, up = h.chunk(2, dim=-1)
    (w * F.silu(gate) * up * grad).sum().backward()
    d_h, d_w = weighted_swiglu_backward(h.detach(), w.detach(), grad)
    torch.testing.assert_close(d_h, h.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d_w, w.grad, rtol=1e-12, atol=1e-12)
    inputs = (h.detach().requires_grad_(), w.detach().requires_grad_())
    assert torch.autograd.gradcheck(weighted_swiglu, inputs)


def test_bf16_rows_are_computed_in_float32_and_rounded_once():
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(5, 16, generator=gen).bfloat16()
    w = torch.rand(5, 1, generator=gen)
    gate, up = h.float().chunk(2, dim=-1)
    assert torch.equal(weighted_swiglu(h, w), (w * F.silu(gate) * up).bfloat16())


_INTERPRETED = r'''
import torch
from dsv3.model.swiglu import triton_swiglu, weighted_swiglu_backward
launch = triton_swiglu()
gen = torch.Generator().manual_seed(2)
for rows, inter, dtype in ((7, 12, torch.float32), (3, 1030, torch.float32), (6, 16, torch.bfloat16)):
    h = torch.randn(rows, 2 * inter, generator=gen).to(dtype)
    w = torch.rand(rows, 1, generator=gen)
    grad = torch.randn(rows, inter, generator=gen).to(dtype)
    want_h, want_w = weighted_swiglu_backward(h, w, grad)
    out, dw = torch.empty_like(h), torch.empty_like(w)
    launch(h, grad, w, None, out, dw, backward=True)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(out.float(), want_h.float(), rtol=tol, atol=tol), (rows, inter, dtype)
    assert torch.allclose(dw, want_w, rtol=1e-5, atol=1e-4), (rows, inter, dtype)
    fwd = torch.empty(rows, inter, dtype=dtype)
    launch(h, None, w, None, fwd, None, backward=False)
    gate, up = h.float().chunk(2, dim=-1)
    assert torch.allclose(fwd.float(), (w * torch.nn.functional.silu(gate) * up), rtol=tol, atol=tol)
print("ok")
'''


@needs_triton
def test_the_triton_kernel_equals_the_torch_backward_under_the_interpreter():
    """The CUDA implementation's kernel, run on CPU tensors by Triton's interpreter: weighted forward,
    backward with dw, one column block and two."""
    run_under_triton_interpreter(_INTERPRETED)
