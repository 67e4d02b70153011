"""Linears of one row as reductions under torch.compile: the batch-1 decode step's GEMVs.

A decode step at batch 1 runs about a hundred tiny matrix-vector products, and on an H200 each
one is a cuBLAS kernel of ~3–5 µs for a weight that takes ~0.5 µs to read (the profile in
docs/serving.md): the step is launch- and latency-bound. Written as a product summed over the
input dimension, a one-row linear is something Inductor generates itself: one reduction kernel
that can take its neighbours' element-wise work in (SwiGLU's silu·up read by the down
projection), instead of a library call it cannot fuse. Eagerly that form would build the whole
product, so it is taken only while compiling, only for one row and only where no gradient is
recorded; everything else calls `F.linear`. The sum runs in float32 over operands in the GEMM's
dtype, as a GEMM's does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Linear", "linear", "one_compiled_row", "compute_dtype"]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype x's GEMMs run in: autocast's where it is on (bf16 on a GPU), else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def one_compiled_row(x: torch.Tensor) -> bool:
    """Whether x (..., in) is one row being compiled with no gradient recorded: the reduction's case."""
    return x.numel() == x.shape[-1] and not torch.is_grad_enabled() and torch.compiler.is_compiling()


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ weight (out, in)ᵀ; one row, compiled and without gradients: as a reduction."""
    if not one_compiled_row(x):
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
