"""Decoder blocks through torch.compile for inference: one compile per kind of block, not per layer.

The engine's step functions and `generate(compile=True)` run each block through `compiled_blocks()`
before their CUDA graphs are captured, so a captured decode step replays Inductor's fused kernels
instead of one kernel per op: at batch 1 a decode step's time is mostly its number of kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack

import torch

from dsv3.compiling import compiled_or_eager

__all__ = ["compile_dynamic", "compiled_blocks"]


def compile_dynamic(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`fn` through torch.compile with dynamic shapes, callable inside a force-eager stance (which
    keeps a model compiled for training from recompiling at every serving shape). Sizes 1 and the
    attention form are specialised, so a server meets a handful of variants, which the engine's
    `warm_up` compiles ahead. Duck sizing is off: it would assume that two sizes equal in the first
    call (a prompt's length and its context) stay equal, and recompile at the first prefix-cache hit.
    A compiler failure warns once and runs `fn` eagerly from then on (`compiled_or_eager`)."""

    def context() -> ExitStack:
        stack = ExitStack()
        stack.enter_context(torch.compiler.set_stance("default"))
        stack.enter_context(torch._dynamo.config.patch(recompile_limit=64))
        stack.enter_context(torch.fx.experimental._config.patch(use_duck_shape=False))
        return stack

    return compiled_or_eager(fn, "decoder blocks", context, dynamic=True)


def _run_block(block: torch.nn.Module, *args) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A decoder block's forward as one function for every block alike: compiling it rather than the
    whole model costs one compile per kind of block (dense, MoE) instead of one over every layer;
    kernels fuse within a block, not across two."""
    return block(*args)


def compiled_blocks() -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]]:
    """A `run_block` for `Transformer.hidden_states`: each block through one compiled function."""
    return compile_dynamic(_run_block)
