"""Linears of one row as reductions under torch.compile: the batch-1 decode step's GEMVs.

A decode step at batch 1 runs about a hundred tiny matrix-vector products, and on an H200 each
one is a cuBLAS kernel of ~3–5 µs for a weight that takes ~0.5 µs to read (the profile in
docs/serving.md): the step is launch- and latency-bound. Written as a product summed over the
input dimension, a one-row linear is something Inductor generates itself: one reduction kernel
that can take its neighbours' element-wise work in (SwiGLU's silu·up read by the down
projection), instead of a library call it cannot fuse. Eagerly that form would build the whole
product, so it is taken only while compiling, only for one row (or a speculative step's two rows
of one sequence) and only where no gradient is recorded; everything else calls `F.linear`. The sum
runs in float32 over operands in the GEMM's dtype, as a GEMM's does. On the H200 this, with the
indexed experts (`moe_ops.gathered_expert_ffn`), took the engine's batch-1 step from 1.28 to 0.82 ms
(docs/performance.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Linear", "linear", "one_compiled_row", "few_compiled_rows", "compute_dtype"]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype x's GEMMs run in: autocast's where it is on (bf16 on a GPU), else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _compiling_without_grad() -> bool:
    return not torch.is_grad_enabled() and torch.compiler.is_compiling()


def one_compiled_row(x: torch.Tensor) -> bool:
    """Whether x (..., in) is one row being compiled with no gradient recorded: the reduction's case."""
    return _compiling_without_grad() and x.numel() == x.shape[-1]


def few_compiled_rows(x: torch.Tensor) -> bool:
    """`one_compiled_row`, or one sequence's two rows, x (1, 2, in): a speculative step verifying a
    draft, which then runs reductions like the one-token step instead of cuBLAS GEMMs. Only the
    (1, T, in) layout is told apart: a flattened (N, in) input of two rows could be two sequences,
    whose count varies within one compiled graph (asking would make the compiler specialise on it)."""
    two = x.dim() == 3 and x.shape[0] == 1 and x.shape[1] <= 2
    return _compiling_without_grad() and (x.numel() == x.shape[-1] or two)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ weight (out, in)ᵀ; while compiling without gradients, for one row or one
    sequence's two (`few_compiled_rows`): as a reduction."""
    if not few_compiled_rows(x):
        return F.linear(x, weight)
    dtype = compute_dtype(x)
    out = (x.to(dtype).float().unsqueeze(-2) * weight.to(dtype).float()).sum(-1)
    return out.to(dtype)


class Linear(nn.Linear):
    """nn.Linear without a bias whose forward is `linear` (same parameters, same state dict)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)
