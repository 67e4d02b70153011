"""Validation numbers: the model's loss and perplexity, the unigram baseline it must beat, router entropy.

The unigram baseline is the cross-entropy of the validation tokens under the training set's token
frequencies (add-one smoothed): what a model that ignores context scores. A language model that
has learned anything beyond token frequencies is below it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from dsv3.config import ConfigError

__all__ = ["validation_loss", "unigram_loss", "router_entropy"]


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


@contextlib.contextmanager
def router_entropy(model: nn.Module) -> Iterator[list[float | None]]:
    """Collect, per MoE layer, the mean entropy of the normalized router scores over the tokens seen
    while the context is open, divided by log(experts): 1 = undecided router, 0 = one expert.
    None for a layer that saw no token (the MTP layers when only the LM loss is evaluated)."""
    sums: list[float] = []
    counts: list[int] = []
    handles = []

    def hook(index: int):
        def fn(module: nn.Module, args, output) -> None:
            scores = output[0].float()  # (N, E) sigmoid scores
            p = scores / scores.sum(-1, keepdim=True)
            ent = -(p * p.clamp_min(1e-12).log()).sum(-1) / math.log(scores.shape[-1])
            sums[index] += ent.sum().item()
            counts[index] += ent.numel()

        return fn

    result: list[float | None] = []
    for i, moe in enumerate(model.moe_layers()):
        sums.append(0.0)
        counts.append(0)
        handles.append(moe.gate.register_forward_hook(hook(i)))
    try:
        yield result
    finally:
        for h in handles:
            h.remove()
        result.extend(s / c if c else None for s, c in zip(sums, counts, strict=True))
