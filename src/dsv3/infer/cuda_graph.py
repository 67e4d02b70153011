"""Capturing a step in a CUDA graph: one launch replays every kernel of a decode step.

`capture(fn)` runs `fn` once on a side stream (lazy initialisation such as cuBLAS handles and
workspaces must not happen during capture), then records one call. Replaying the graph reruns
those kernels on the same memory: inputs are fed by copying into the tensors `fn` reads, and the
output is the tensor the capture returned. Graphs given the same `pool` share their scratch
memory, which is safe when they are replayed one at a time (the engine's steps are).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

__all__ = ["capture"]

T = TypeVar("T")


def capture(fn: Callable[[], T], pool: tuple | None = None) -> tuple[torch.cuda.CUDAGraph, T]:
    """(graph, static output) of one call of `fn` (see the module docstring)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out
