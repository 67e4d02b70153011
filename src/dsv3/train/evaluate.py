"""Validation numbers: the model's loss and perplexity, the unigram baseline it must beat, router entropy.

The unigram baseline is the cross-entropy of the validation tokens under the training set's token
frequencies (add-one smoothed): what a model that ignores context scores. A language model that
has learned anything beyond token frequencies is below it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dsv3.config import ConfigError

__all__ = ["validation_loss", "unigram_loss", "RouterEntropy", "router_entropy"]


@torch.no_grad()
def validation_loss(model: nn.Module, batches: list[torch.Tensor], device: torch.device, autocast) -> float:
    """Mean next-token cross-entropy (nats) over every label of `batches` ((B, T+1) token windows)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            batch = batch.to(device)
            with autocast:
                out = model.forward_with_losses(batch[:, :-1], batch[:, 1:], return_logits=False)
            n = batch[:, 1:].numel()
            total += out.lm_loss.item() * n
            count += n
    finally:
        model.train(was_training)
    return total / max(count, 1)


def unigram_loss(train_counts: np.ndarray, batches: list[torch.Tensor]) -> float:
    """Cross-entropy (nats) of the validation labels under add-one smoothed training frequencies."""
    counts = train_counts.astype(np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    labels = np.concatenate([b[:, 1:].reshape(-1).numpy() for b in batches])
    if labels.size and labels.max() >= len(log_p):
        raise ConfigError(f"validation token id {int(labels.max())} >= model vocab_size {len(log_p)}")
    return float(-log_p[labels].mean())


@dataclass
class RouterEntropy:
    """Per MoE layer, the summed normalized router-score entropy of the tokens seen, and their count."""

    sums: list[float]
    counts: list[int]
    paused: bool = False  # tokens seen while paused are not counted (padding in a distributed eval)

    def values(self) -> list[float | None]:
        """Mean entropy per layer, None for a layer that saw no token."""
        return [s / c if c else None for s, c in zip(self.sums, self.counts, strict=True)]


@contextlib.contextmanager
def router_entropy(moe_layers: list[nn.Module]) -> Iterator[RouterEntropy]:
    """Collect, per MoE layer, the entropy of the normalized router scores over the tokens seen while
    the context is open, divided by log(experts): 1 = undecided router, 0 = one expert. A layer that
    saw no token (the MTP layers when only the LM loss is evaluated) reads None in `values()`."""
    acc = RouterEntropy([0.0] * len(moe_layers), [0] * len(moe_layers))
    handles = []

    def hook(index: int):
        def fn(module: nn.Module, args, output) -> None:
            if acc.paused:
                return
            scores = output[0].float()  # (N, E) sigmoid scores
            p = scores / scores.sum(-1, keepdim=True)
            ent = -(p * p.clamp_min(1e-12).log()).sum(-1) / math.log(scores.shape[-1])
            acc.sums[index] += ent.sum().item()
            acc.counts[index] += ent.numel()

        return fn

    for i, moe in enumerate(moe_layers):
        handles.append(moe.gate.register_forward_hook(hook(i)))
    try:
        yield acc
    finally:
        for h in handles:
            h.remove()
