"""Triton kernels as the CUDA implementations of torch custom ops, where CUDA and Triton are present.

An op keeps its torch implementation for every other device (and the CPU tests), and the tests run
the kernels themselves on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["register_triton_kernels"]


def register_triton_kernels(make: Callable[[], dict[torch.library.CustomOpDef, Callable]]) -> None:
    """Register each of `make()`'s functions as its op's CUDA kernel; nothing without CUDA, or on a
    CUDA build without Triton (`make` raises ImportError): the torch implementations run."""
    if not torch.cuda.is_available():
        return
    try:
        kernels = make()
    except ImportError:
        return
    for op, fn in kernels.items():
        op.register_kernel("cuda")(fn)
