"""SwiGLU over packed [gate; up] rows, optionally weighted per row: the routed experts' activation.

The routed experts' first grouped GEMM writes [gate; up] (M, 2I) a row. Every dispatcher (one
process, and both expert-parallel ones) applies each row's combine weight inside the activation
(`weighted_swiglu`: w · silu(gate) · up), so the combine back into tokens is a plain sum and no
expert output is kept for the weight's gradient.

Its backward is one pass a row: d gate, d up and dw = Σ_i grad · silu(gate) · up from the saved
[gate; up] and the output's gradient. Left to Inductor, that pass became a "pointwise cat" that
evaluates both halves' expressions for every element, written twice (once for each grouped GEMM
that reads it), plus a second kernel for dw: 0.27 ms a layer at 16k tokens on an H200 for ~0.5 GB
of traffic. On CUDA it is a Triton kernel (`swiglu_kernel`, one program a row), elsewhere the same
math in torch; a custom op, opaque to torch.compile. The all-gather dispatcher's bounded rows
(dsv3.parallel.bounded_rows) launch the same kernel, forward and backward, with a bound.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from dsv3.model.autograd_output import fresh_output
from dsv3.model.cuda_kernels import register_triton_kernels

__all__ = [
    "swiglu", "weighted_swiglu", "weighted_swiglu_forward", "weighted_swiglu_backward", "triton_swiglu",
]

BLOCK = 1024  # columns a program handles at a time


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """[gate; up] (M, 2I) → silu(gate) · up (M, I)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _wide(t: torch.Tensor) -> torch.dtype:
    """The dtype to compute t's values in: float32, or t's own where that is wider (float64)."""
    return torch.promote_types(t.dtype, torch.float32)


def weighted_swiglu_forward(gate_up: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """w (M, 1) · silu(gate) · up, computed in float32 (or wider) and rounded once to gate_up's dtype."""
    gate, up = gate_up.to(_wide(gate_up)).chunk(2, dim=-1)
    return (F.silu(gate) * up * w).to(gate_up.dtype)


@torch.library.custom_op("dsv3::weighted_swiglu_backward", mutates_args=())
def weighted_swiglu_backward(
    gate_up: torch.Tensor, w: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of w (M, 1) · silu(gate) · up given the output's (M, I): d [gate; up] (M, 2I) in
    gate_up's dtype and dw (M, 1) in w's."""
    gate, up = gate_up.to(_wide(gate_up)).chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    g = grad.to(gate.dtype)
    grad_w = (g * silu * up).sum(-1, keepdim=True).to(w.dtype)
    gw = g * w.to(gate.dtype)
    d_gate = gw * up * sig * (1 + gate * (1 - sig))
    return torch.cat((d_gate, gw * silu), dim=-1).to(gate_up.dtype), grad_w


@weighted_swiglu_backward.register_fake
def _(gate_up, w, grad):
    return torch.empty_like(gate_up), torch.empty_like(w)


class _WeightedSwiGLU(torch.autograd.Function):
    """`weighted_swiglu_forward` with its backward: the forward stays torch ops, which Inductor fuses
    at memory speed; the backward is the custom op."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate_up, w)
        return fresh_output(weighted_swiglu_forward(gate_up, w))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate_up, w = ctx.saved_tensors
        return weighted_swiglu_backward(gate_up, w, grad)


def weighted_swiglu(gate_up: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """w (M, 1) · silu(gate) · up (M, I) from [gate; up] (M, 2I) (see the module docstring)."""
    return _WeightedSwiGLU.apply(gate_up, w)


# --- CUDA: the Triton kernel ---------------------------------------------------------------------


def triton_swiglu() -> Callable[..., None]:
    """`launch(gate_up, grad, w, bound, out, dw, backward)`: the Triton SwiGLU over every row of
    gate_up (P, 2I), one program a row; rows at or past `bound` (a device scalar, or None: every row)
    are skipped. Forward: out (P, I) = w · silu(gate) · up. Backward: out (P, 2I) = d [gate; up] given
    grad (P, I), and dw (P, 1) = Σ_i grad · silu(gate) · up when w is given (0 past the bound). It
    runs on CUDA tensors, and on CPU ones under Triton's interpreter (TRITON_INTERPRET=1: the tests)."""
    import triton
    import triton.language as tl

    @triton.jit
    def swiglu_kernel(gate_up, grad, weight, bound, out, dweight, inter: tl.constexpr,
                      BACKWARD: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BOUND: tl.constexpr,
                      BLOCK: tl.constexpr):
        p = tl.program_id(0).to(tl.int64)
        live = p >= 0
        if HAS_BOUND:
            live = p < tl.load(bound)
        w = 1.0
        if HAS_WEIGHT:
            w = tl.load(weight + p, mask=live, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, inter, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = (cols < inter) & live
            g = tl.load(gate_up + p * 2 * inter + cols, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(gate_up + p * 2 * inter + inter + cols, mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(g)
            if BACKWARD:
                dh = tl.load(grad + p * inter + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_WEIGHT:
                    acc += dh * g * sig * u
                dh = dh * w
                d_gate, d_up = dh * u * sig * (1 + g * (1 - sig)), dh * g * sig
                tl.store(out + p * 2 * inter + cols, d_gate.to(out.dtype.element_ty), mask=mask)
                tl.store(out + p * 2 * inter + inter + cols, d_up.to(out.dtype.element_ty), mask=mask)
            else:
                tl.store(out + p * inter + cols, (g * sig * u * w).to(out.dtype.element_ty), mask=mask)
        if BACKWARD and HAS_WEIGHT:  # every row: 0 past the bound (its loads were masked)
            tl.store(dweight + p, tl.sum(acc, axis=0).to(dweight.dtype.element_ty))

    def launch(gate_up, grad, w, bound, out, dw, backward: bool) -> None:
        if not gate_up.shape[0]:
            return
        inter = gate_up.shape[1] // 2
        dummy = gate_up  # a pointer the kernel never reads
        swiglu_kernel[(gate_up.shape[0],)](
            gate_up, grad if grad is not None else dummy, w if w is not None else dummy,
            bound if bound is not None else dummy, out, dw if dw is not None else dummy, inter,
            BACKWARD=backward, HAS_WEIGHT=w is not None, HAS_BOUND=bound is not None,
            BLOCK=min(BLOCK, triton.next_power_of_2(inter)))

    return launch


def _cuda_backward() -> dict:
    """`weighted_swiglu_backward`'s CUDA implementation: the Triton kernel."""
    launch = triton_swiglu()

    def backward(gate_up, w, grad):
        gate_up, w, grad = gate_up.contiguous(), w.contiguous(), grad.contiguous()
        out, dw = torch.empty_like(gate_up), torch.empty_like(w)
        launch(gate_up, grad, w, None, out, dw, backward=True)
        return out, dw

    return {weighted_swiglu_backward: backward}


register_triton_kernels(_cuda_backward)
