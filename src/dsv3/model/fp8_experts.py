"""FP8 for the routed experts' grouped GEMMs: rowwise scaling, as torch's `_scaled_grouped_mm` takes it.

torch has no blockwise-scaled grouped GEMM (DeepSeek-V3 used DeepGEMM's), but cuBLAS/CUTLASS run a
grouped FP8 GEMM with one scale per row of the tokens and one per output channel of each expert
(sm90). So here, for x (M, in) sorted by expert and w (E, out, in):

- forward  y  = x · W_eᵀ: x scaled per row (over `in`), W per (expert, output row);
- dgrad    dx = dy · W_e: dy scaled per row (over `out`), W per (expert, input column);
- wgrad    dW_e = dy_eᵀ · x_e: in the compute dtype (bf16 grouped GEMM), as before: FP8's
  per-group scaling of both operands along the tokens is not worth its complexity for a third of
  the FLOPs until the other two are measured.

On a CUDA GPU the FP8 products are `torch._scaled_grouped_mm`; elsewhere the same quantized values
and scales are multiplied in float32 (`padded_expert_mm`), so the CPU tests check the GPU's
arithmetic up to the order of the sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3.model.autograd_output import fresh_output
from dsv3.model.fp8 import gpu_kernels, quantize_rows
from dsv3.model.gemv import compute_dtype
from dsv3.model.moe_ops import padded_expert_mm, padded_expert_mm_wgrad

__all__ = ["fp8_expert_matmul"]


def _grouped(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
             ends: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """Rows of a (M, K) sorted by group, each times its group's b (E, K, N): FP8 values with scales per
    row of a (M,) and per (group, column) of b (E, N) → (M, N) in out_dtype."""
    if gpu_kernels(a):  # a row-major, each b column-major: the callers lay them out so
        offs = ends.to(torch.int32)
        return torch._scaled_grouped_mm(a, b, a_scale, b_scale, offs=offs, out_dtype=out_dtype)
    a32 = a.float() * a_scale.unsqueeze(-1)
    b32 = b.float() * b_scale.unsqueeze(1)
    return padded_expert_mm(a32, b32.transpose(-2, -1).contiguous(), ends).to(out_dtype)


@torch.library.custom_op("dsv3::grouped_weight_grad", mutates_args=())
def _grouped_weight_grad(dy: torch.Tensor, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Each expert's dy_eᵀ · x_e → (E, out, in), one grouped GEMM contracting over the tokens. Both
    operands row-major, so the token dimension is the outer one: a contiguous one would need every
    expert's rows to start 16 bytes apart (grouped_mm's device assert). An opaque op, because
    Inductor otherwise lays out a fused `dy.t()` as it likes (it wrote it row-major, and the first
    compiled FP8 step on the GPU hit that assert)."""
    return F.grouped_mm(dy.contiguous().t(), x.contiguous(), offs=offs)


@_grouped_weight_grad.register_fake
def _(dy: torch.Tensor, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return dy.new_empty(offs.shape[0], dy.shape[1], x.shape[1])


class _Fp8ExpertMatmul(torch.autograd.Function):
    """(M, in) rows sorted by expert times their expert's w (E, out, in)ᵀ, FP8 forward and dgrad."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        xq, xs = quantize_rows(x)
        wq, ws = quantize_rows(w)  # per (expert, output row): (E, out, in), (E, out)
        ctx.save_for_backward(x, w, ends)
        return fresh_output(_grouped(xq, xs, wq.transpose(-2, -1), ws, ends, x.dtype))

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w, ends = ctx.saved_tensors
        dy = dy.to(x.dtype)
        dyq, dys = quantize_rows(dy)
        wtq, wts = quantize_rows(w.transpose(-2, -1))  # per (expert, input column): (E, in, out), (E, in)
        dx = _grouped(dyq, dys, wtq.transpose(-2, -1), wts, ends, x.dtype)
        if gpu_kernels(dy) and dy.dtype == torch.bfloat16:  # per expert: dy_eᵀ · x_e, one grouped GEMM
            dw = _grouped_weight_grad(dy, x, ends.to(torch.int32))
        else:
            dw = padded_expert_mm_wgrad(dy, x, ends)
        return dx, dw.to(w.dtype), None


def fp8_expert_matmul(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """`moe_ops.expert_matmul` with FP8 products (module docstring): rows of x (M, in) sorted by expert,
    w (E, out, in), each expert's end offset → (M, out), in autocast's dtype when it is on."""
    dtype = compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        return _Fp8ExpertMatmul.apply(x.to(dtype), w, ends)
