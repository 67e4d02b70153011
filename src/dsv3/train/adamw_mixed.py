"""AdamW for mixed precision: moments in bfloat16 or float32, and float32 master weights for bf16 models.

Two memory-bound savings torch's fused AdamW cannot make, since its kernels want the state in the
parameter's dtype:

- **bf16 moments** (`train.optimizer_state_dtype: bfloat16`): DeepSeek-V3 keeps AdamW's first and
  second moments in BF16 "without observable performance degradation" (the V3 report, §3.3.2). That
  halves the optimizer state (4 bytes a parameter instead of 8) and the step's memory traffic.
- **master weights** (`train.param_dtype: bfloat16`, `dsv3.train.master_weights`): the model holds
  bf16 weights, so the forward and backward cast nothing and the gradients come out bf16; the
  float32 masters live here. The update reads a bf16 gradient and the fp32 master, writes the master
  and its bf16 rounding into the model's weight, in the same kernel.

The update is one function over every tensor of a group: each moment is read in its storage dtype,
updated in fp32 (the parameter update uses the fp32 values) and stored back in that dtype. On a GPU
the function is compiled once (Inductor fuses each tensor's update into one kernel); on a CPU it runs
as written. The math is torch's AdamW (decoupled weight decay, bias corrections), and like fused AdamW
it skips a step on the device where `found_inf` is set (the trainer's non-finite guard), without a
host sync. `grad_scale` multiplies the gradients as they are read: the trainer folds gradient
clipping in there, so the gradients are read once and never rewritten.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch.distributed.tensor import DTensor

from dsv3.compiling import compiled_or_eager

__all__ = ["MixedAdamW", "adamw_update"]


def _local(t: torch.Tensor) -> torch.Tensor:
    """The rank's own values of a (possibly sharded) tensor, sharing its storage."""
    return t.to_local() if isinstance(t, DTensor) else t


def adamw_update(
    params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], lr: torch.Tensor, skip: torch.Tensor,
    grad_scale: torch.Tensor, beta1: float, beta2: float, eps: float, weight_decay: float,
    copies: list[torch.Tensor] | None = None,
) -> None:
    """One AdamW step in place over plain tensors, on the gradients times `grad_scale` (0-dim); nothing
    changes where `skip` (0-dim, 0 or 1) is 1. `copies[i]`, when given, receives `params[i]`'s new
    value in its own dtype (a bf16 model weight beside its float32 master)."""
    keep = skip > 0
    for i, (p, g, m, v, step) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True)):
        t = step + (1 - skip)
        g32 = g.float() * grad_scale
        m32 = m.float().lerp(g32, 1 - beta1)
        v32 = v.float() * beta2 + (1 - beta2) * g32 * g32
        bias1, bias2 = 1 - beta1**t, 1 - beta2**t
        denom = v32.sqrt() / bias2.sqrt() + eps
        new = torch.where(keep, p, p * (1 - lr * weight_decay) - (lr / bias1) * m32 / denom)
        p.copy_(new)
        if copies is not None:
            copies[i].copy_(new.to(copies[i].dtype))
        m.copy_(torch.where(keep, m, m32.to(m.dtype)))
        v.copy_(torch.where(keep, v, v32.to(v.dtype)))
        step.copy_(t)


class MixedAdamW(torch.optim.Optimizer):
    """AdamW with moments stored in `state_dtype` and, for each parameter in `masters`, the update made
    on that float32 master and copied into the parameter (see the module docstring). Set `found_inf` (a
    0-dim float tensor on the parameters' device, 1 = skip) before `step()` to skip a step on the
    device, `grad_scale` (0-dim) to scale the gradients it reads (a clipping coefficient), and `grads` to
    read each parameter's gradient there instead of from `.grad`."""

    def __init__(
        self, params: Iterable, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
        weight_decay: float = 0.0, state_dtype: torch.dtype = torch.bfloat16,
        masters: Mapping[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.state_dtype = state_dtype
        self.masters = dict(masters or {})
        self.found_inf: torch.Tensor | None = None
        self.grad_scale: torch.Tensor | None = None
        # gradients kept apart from `.grad` (float32 sums of a bf16 model's, `Float32GradAccumulation`)
        self.grads: Mapping[torch.Tensor, torch.Tensor] | None = None
        self._update = None  # adamw_update, compiled on the first step on a GPU

    def _state(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=_local(p).device)
            state["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype)
        for key in ("exp_avg", "exp_avg_sq"):  # load_state_dict casts state to the parameter's dtype
            if state[key].dtype != self.state_dtype:
                state[key] = state[key].to(self.state_dtype)
        if state["step"].device != _local(p).device:
            state["step"] = state["step"].to(_local(p).device)
        return state["step"], _local(state["exp_avg"]), _local(state["exp_avg_sq"])

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim.Optimizer's
        if closure is not None:
            raise ValueError("MixedAdamW: closures are not supported")
        grad_of = (lambda p: p.grad) if self.grads is None else self.grads.get
        for group in self.param_groups:
            params = [p for p in group["params"] if grad_of(p) is not None]
            if not params:
                continue
            device = _local(params[0]).device
            if self._update is None:
                self._update = adamw_update
                if device.type == "cuda":
                    self._update = compiled_or_eager(adamw_update, "MixedAdamW's update")
            states = [self._state(p) for p in params]
            lr = torch.full((), group["lr"], dtype=torch.float32, device=device)
            none, one = torch.zeros((), device=device), torch.ones((), device=device)
            skip = (none if self.found_inf is None else self.found_inf).float()
            scale = (one if self.grad_scale is None else self.grad_scale).float()
            beta1, beta2 = group["betas"]
            weights = [_local(self.masters.get(p, p)) for p in params]
            copies = [_local(p) for p in params] if self.masters else None
            self._update(
                weights, [_local(grad_of(p)) for p in params], [s[1] for s in states], [s[2] for s in states],
                [s[0] for s in states], lr, skip, scale, beta1, beta2, group["eps"], group["weight_decay"],
                copies,
            )
        return None
