"""AdamW with decoupled weight decay on matrices only, and learning-rate schedules as pure functions.

The schedule is a function of the step alone, so resuming needs no scheduler object: the step in
the checkpoint gives the same learning rate back, bit for bit.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from dsv3.config import TrainConfig
from dsv3.train.adamw_mixed import MixedAdamW

__all__ = [
    "GAMMA_PER_LR", "param_groups", "build_optimizer", "skips_on_device", "folds_clipping",
    "clip_coefficient", "total_grad_norm", "lr_at", "set_lr", "bias_update_speed",
    "describe_bias_update_speed",
]

log = logging.getLogger(__name__)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay weight matrices (and stacked expert weights); never norms, biases or frozen buffers.

    A 1-D tensor is a norm scale or a bias: decaying it pulls it toward 0, which for an RMSNorm
    scale means shrinking the signal, not regularising it. Sharded (DTensor) parameters that sit beside
    plain ones (tensor parallelism without FSDP) get groups of their own: the multi-tensor kernels
    take one kind per call.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {(True, False): [], (False, False): []}
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        groups.setdefault((p.ndim >= 2, isinstance(p, DTensor)), []).append(p)
    if not groups[True, False] and not groups[False, False]:  # all sharded: the two usual groups
        groups = {(decay, False): groups.pop((decay, True), []) for decay in (True, False)}
    return [
        {"params": params, "weight_decay": weight_decay if decay else 0.0}
        for (decay, _), params in groups.items()
    ]


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, fused: bool | None = None,
    masters: Mapping[torch.Tensor, torch.Tensor] | None = None,
) -> torch.optim.Optimizer:
    """AdamW over `param_groups`. MixedAdamW where torch's kernels cannot serve: bf16 moments
    (`optimizer_state_dtype`; auto: exactly when there are masters, `TrainConfig.bf16_moments`) or
    float32 `masters` of bf16 weights (`param_dtype`, from `keep_master_weights`); else torch's, the
    fused kernel on CUDA (or where `fused`), the multi-tensor one elsewhere (the CPU runs and their
    reference curve are kept on it)."""
    fused = next(model.parameters()).is_cuda if fused is None else fused
    groups = param_groups(model, cfg.weight_decay)
    log.debug("AdamW: parameters per group (weight decay): %s",
              [(sum(p.numel() for p in g["params"]), g["weight_decay"]) for g in groups])
    bf16_moments = cfg.bf16_moments_with(masters is not None)
    if bf16_moments or masters:
        state_dtype = torch.bfloat16 if bf16_moments else torch.float32
        return MixedAdamW(groups, lr=lr_at(0, cfg), betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                          state_dtype=state_dtype, masters=masters)
    return torch.optim.AdamW(
        groups,
        lr=lr_at(0, cfg),
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=True if fused else None,
        foreach=None if fused else True,
    )


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.found_inf` (set before `step()`) skips a step on the device: fused AdamW's
    flag, as GradScaler sets it, and MixedAdamW's."""
    return isinstance(optimizer, MixedAdamW) or bool(optimizer.defaults.get("fused"))


def folds_clipping(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer takes the clipping coefficient as `grad_scale` and scales the gradients as
    it reads them (MixedAdamW), instead of the gradients being rewritten first."""
    return isinstance(optimizer, MixedAdamW)


def total_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all `grads` as a float32 scalar, whatever their dtype (`get_total_norm` returns bf16
    for bf16 gradients, three significant digits: too coarse for the logged norm)."""
    if not grads:
        return torch.zeros(())
    if all(g.dtype == torch.float32 for g in grads):
        return torch.nn.utils.get_total_norm(grads)
    norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)
    return torch.linalg.vector_norm(torch.stack(norms))


def clip_coefficient(total_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """torch's clipping factor: min(1, max_norm / (norm + 1e-6)), on the device."""
    return (max_norm / (total_norm + 1e-6)).clamp(max=1.0)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then the chosen schedule.

    cosine: half a cosine from lr to min_lr over the steps after warmup.
    constant: lr after warmup.
    wsd (warmup-stable-decay): lr until the last `decay_fraction` of the steps, then linear to min_lr.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        span = max(cfg.steps - cfg.warmup_steps, 1)
        progress = min((step - cfg.warmup_steps) / span, 1.0)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))
    # wsd
    decay_steps = max(round(cfg.decay_fraction * cfg.steps), 1)
    decay_start = max(cfg.steps - decay_steps, cfg.warmup_steps)
    if step < decay_start:
        return cfg.lr
    progress = min((step - decay_start) / max(cfg.steps - decay_start, 1), 1.0)
    return cfg.lr + (cfg.min_lr - cfg.lr) * progress


# DeepSeek-V3 (§4.2) moves the routing bias by γ = 0.001 per step while AdamW trains at lr = 2.2e-4.
GAMMA_PER_LR = 1e-3 / 2.2e-4


def bias_update_speed(step: int, cfg: TrainConfig) -> float:
    """γ of the aux-loss-free balancing at optimizer step `step` (0-based).

    A number in the config is used as is. `auto` keeps DeepSeek-V3's ratio of γ to the learning rate:
    AdamW moves every router weight by about lr per step whatever the size of its gradient, so the
    router's scores drift at a speed set by lr, and the bias that must undo that drift needs a step tied
    to it (docs/training.md has the measurements). During warmup γ holds the peak value, as the paper
    held γ = 0.001 while its lr warmed up; after it γ decays with lr, so the balance gets finer as the
    router settles. The paper's γ = 0.001 is this rule at its lr of 2.2e-4.
    """
    if cfg.bias_update_speed != "auto":
        return cfg.bias_update_speed
    return GAMMA_PER_LR * lr_at(max(step, cfg.warmup_steps), cfg)


def describe_bias_update_speed(cfg: TrainConfig) -> dict[str, float | str]:
    """The resolved γ for the run record: the rule, γ at the start and at the last step."""
    if cfg.bias_update_speed != "auto":
        return {"rule": "constant", "gamma": cfg.bias_update_speed}
    return {
        "rule": "auto",
        "gamma_per_lr": GAMMA_PER_LR,
        "gamma_first": bias_update_speed(0, cfg),
        "gamma_last": bias_update_speed(cfg.steps - 1, cfg),
    }


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
