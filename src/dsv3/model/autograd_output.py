"""What an autograd.Function's forward returns, so that torch.compile keeps its gradient.

Under torch 2.11's Dynamo (the GPU machine's torch; 2.13 is not affected) a Function whose forward
returns a tensor that an in-place op filled (a collective's output buffer, `copy_`, `+=`), or that a
no-op conversion handed back (`.to` its own dtype, `.float()` of float32, `.contiguous()` of a
contiguous tensor), loses the tensor's gradient without a word: the compiled graph hands it on as a
constant and everything before it gets zeros. That left the routed experts untrained under expert
parallelism on 2 H200s (both dispatchers return collective buffers) and in float32 runs (the
combine's `.to(float32)`). A fresh view of the tensor is an ordinary graph output; it costs nothing.
"""

from __future__ import annotations

import torch

__all__ = ["fresh_output"]


def fresh_output(t: torch.Tensor) -> torch.Tensor:
    """t as a new view (same storage, same values): the form to return from a Function's forward."""
    return t.view_as(t)
