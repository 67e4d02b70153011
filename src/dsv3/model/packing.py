"""Linears that read the same input, packed into one weight so that one GEMM computes them all.

At batch 1 a decode step's time is mostly its number of kernels (docs/serving.md). MLA's two input
projections (q_a or q, and kv_a) read the same hidden state, and so do a SwiGLU's gate and up: each
pair can be one GEMM over the concatenated weights. `pack_linears` concatenates them and re-points
every linear's weight at its slice of the packed tensor, so nothing is stored twice and the modules
still work one by one (state dicts, checkpoints, Hugging Face export). It is for inference: call it
once the model sits on its final device and dtype (moving the model later would copy the parameters
apart from the packed tensor). The packed tensor carries no gradient, so a forward that records one
(`packed_weight` returns None under grad mode) runs the linears one by one and still trains them.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["pack_linears", "packed_weight"]


@torch.no_grad()
def pack_linears(*linears: nn.Linear, packed: torch.Tensor | None = None) -> torch.Tensor:
    """One (Σ out, in) weight holding each linear's rows in order; each linear's weight becomes a view.

    `packed`: the linears' earlier packing, returned as it is while their weights are still its
    slices. Packing anew would free it, and a CUDA graph captured earlier (another engine's over the
    same model) would go on reading the freed memory."""
    if any(lin.bias is not None for lin in linears):
        raise ValueError("pack_linears: linears with a bias are not packed")
    if packed is not None and _backs(packed, linears):
        return packed
    packed = torch.cat([lin.weight.detach() for lin in linears])
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight.data = packed[start : start + rows]
        start += rows
    return packed


def packed_weight(packed: torch.Tensor | None) -> torch.Tensor | None:
    """The packed weight where a forward may use it: packed, and no gradient being recorded."""
    return None if packed is None or torch.is_grad_enabled() else packed


def _backs(packed: torch.Tensor, linears: tuple[nn.Linear, ...]) -> bool:
    """Whether each linear's weight is, in order, the next rows of `packed`."""
    start = 0
    for lin in linears:
        w, rows = lin.weight, lin.weight.shape[0]
        part = packed[start : start + rows]
        if w.device != packed.device or w.dtype != packed.dtype or w.shape != part.shape:
            return False
        if w.data_ptr() != part.data_ptr() or w.stride() != part.stride():
            return False
        start += rows
    return start == packed.shape[0]
