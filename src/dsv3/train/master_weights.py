"""bf16 weights for compute, float32 masters for the optimizer (`train.param_dtype: bfloat16`).

With float32 weights under bf16 autocast, every step casts each weight to bf16 for its GEMMs (again
in the backward where the compiler recomputes the cast) and each bf16 weight gradient up to float32:
on `small` on an H200 these casts were the main difference between the trainer's step and a pure-bf16
one. Megatron's bf16 training instead keeps the model's weights in bf16 and their float32 "main"
copies in the optimizer, which updates the master and writes its rounding back into the weight
(`dsv3.train.adamw_mixed`). The residual stream then runs in bf16 too, as in Megatron, torchtitan and
transformers.

The model's `state_dict()` (what checkpoints save) returns the float32 masters in place of the bf16
weights, so a checkpoint is the same whichever way it was trained, and a resumed run starts its
masters from exact float32 values. Over several micro-batches the gradients add up in float32
(`Float32GradAccumulation`, Megatron's `main_grad`): summed in bf16, each addition would round to 8
bits of mantissa.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Float32GradAccumulation", "keep_master_weights"]


def keep_master_weights(
    model: nn.Module, dtype: torch.dtype = torch.bfloat16
) -> dict[nn.Parameter, torch.Tensor]:
    """Cast `model`'s float32 parameters to `dtype` in place (buffers, such as the router's bias, stay
    as they are) and return each one's float32 master: a copy of its values before the cast. Call it
    before compiling the model. From then on the model's state dict holds the masters."""
    masters: dict[nn.Parameter, torch.Tensor] = {}
    with torch.no_grad():
        for p in model.parameters():
            if p.dtype == torch.float32:
                masters[p] = p.detach().clone()
                p.data = p.data.to(dtype)

    def masters_in_state_dict(module: nn.Module, state: dict, prefix: str, _meta) -> None:
        for name, p in module.named_parameters(prefix=prefix.rstrip("."), remove_duplicate=False):
            master = masters.get(p)
            # keep_vars=True asks for the live parameters themselves: leave those
            if master is not None and name in state and not isinstance(state[name], nn.Parameter):
                state[name] = master.detach()

    model.register_state_dict_post_hook(masters_in_state_dict)
    return masters


class Float32GradAccumulation:
    """Sums each parameter's gradients over a step's micro-batches in float32: a hook takes every bf16
    gradient as the backward makes it, adds it to `grads[p]` and frees it (`p.grad` stays None; a bf16
    parameter cannot hold a float32 `.grad`). The optimizer and the gradient norm read `grads`;
    `reset()` after the optimizer step starts the next sum."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.grads: dict[nn.Parameter, torch.Tensor] = {}
        for p in params:
            p.register_post_accumulate_grad_hook(self._take)

    def _take(self, p: nn.Parameter) -> None:
        total = self.grads.get(p)
        if total is None:
            self.grads[p] = p.grad.float()
        else:
            total.add_(p.grad)
        p.grad = None

    def reset(self) -> None:
        self.grads.clear()
