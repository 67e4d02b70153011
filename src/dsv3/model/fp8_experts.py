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

from dsv3.model.fp8 import quantize_rows
from dsv3.model.gemv import compute_dtype
from dsv3.model.moe_ops import padded_expert_mm, padded_expert_mm_wgrad

__all__ = ["fp8_expert_matmul"]

def _grouped(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
             ends: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """Rows of a (M, K) sorted by group, each times its group's b (E, K, N): FP8 values with scales per
    row of a (M,) and per (group, column) of b (E, N) → (M, N) in out_dtype."""
    if a.device.type in ("cuda", "meta"):  # a row-major, each b column-major: the callers lay them out so
        offs = ends.to(torch.int32)
        return torch._scaled_grouped_mm(a, b, a_scale, b_scale, offs=offs, out_dtype=out_dtype)
    a32 = a.float() * a_scale.unsqueeze(-1)
    b32 = b.float() * b_scale.unsqueeze(1)
    return padded_expert_mm(a32, b32.transpose(-2, -1).contiguous(), ends).to(out_dtype)


class _Fp8ExpertMatmul(torch.autograd.Function):
    """(M, in) rows sorted by expert times their expert's w (E, out, in)ᵀ, FP8 forward and dgrad."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        xq, xs = quantize_rows(x)
        wq, ws = quantize_rows(w)  # per (expert, output row): (E, out, in), (E, out)
        ctx.save_for_backward(x, w, ends)
        return _grouped(xq, xs, wq.transpose(-2, -1), ws, ends, x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w, ends = ctx.saved_tensors
        # row-major, so that the token dimension grouped_mm contracts in wgrad is the outer one: a
        # contiguous one would need every expert's rows to start 16-byte aligned (its device assert)
        dy, x = dy.to(x.dtype).contiguous(), x.contiguous()
        dyq, dys = quantize_rows(dy)
        wtq, wts = quantize_rows(w.transpose(-2, -1))  # per (expert, input column): (E, in, out), (E, in)
        dx = _grouped(dyq, dys, wtq.transpose(-2, -1), wts, ends, x.dtype)
        if dy.device.type in ("cuda", "meta") and dy.dtype == torch.bfloat16:  # dy_eᵀ · x_e: one GEMM
            dw = F.grouped_mm(dy.t(), x, offs=ends.to(torch.int32))
        else:
            dw = padded_expert_mm_wgrad(dy, x, ends)
        return dx, dw.to(w.dtype), None


def fp8_expert_matmul(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """`moe_ops.expert_matmul` with FP8 products (module docstring): rows of x (M, in) sorted by expert,
    w (E, out, in), each expert's end offset → (M, out), in autocast's dtype when it is on."""
    dtype = compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        return _Fp8ExpertMatmul.apply(x.to(dtype), w, ends)
