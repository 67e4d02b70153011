"""One micro-batch forward and backward, the same in one process and on every data-parallel rank."""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from torch import nn

from dsv3.config import TrainConfig

__all__ = ["micro_batch"]


def micro_batch(
    model: nn.Module, batch: torch.Tensor, tc: TrainConfig, n_micro: int, autocast: AbstractContextManager
) -> torch.Tensor:
    """Backpropagate loss / n_micro for a (B, T+1) window batch; its (loss, lm, mtp, balance) / n_micro."""
    with autocast:
        out = model.forward_with_losses(
            batch[:, :-1], batch[:, 1:], mtp_lambda=tc.mtp_lambda, balance_alpha=tc.balance_alpha,
            return_logits=False,
        )
    (out.loss / n_micro).backward()
    zero = out.lm_loss.new_zeros(())
    return torch.stack([
        out.loss.detach(), out.lm_loss.detach(),
        zero if out.mtp_loss is None else out.mtp_loss.detach(),
        zero if out.balance_loss is None else out.balance_loss.detach(),
    ]) / n_micro
