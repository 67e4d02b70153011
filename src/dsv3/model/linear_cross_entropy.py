"""The output head's cross-entropy without its whole logits: each chunk's gradients made in the forward.

At a large vocabulary the logits (tokens × vocab), their float32 copy and its gradient are a step's
largest tensors. `linear_cross_entropy` makes them one chunk of positions at a time and, while a
chunk's logits exist, also computes that chunk's gradients (softmax − one-hot, times the weight for
the hidden states, times the hidden states for the weight), as Liger-Kernel's fused linear
cross-entropy does. The backward only scales the kept gradients by the incoming one (a loss enters
the total linearly, so its gradient is one scalar). It costs the three GEMMs of whole logits, where
keeping only the inputs and remaking each chunk's logits in the backward (activation checkpointing)
costs a fourth and ran at 0.55-0.68x whole logits' speed on an H200 (benchmarks/cross_entropy.py).
What it holds from the forward to the backward is the hidden states' gradient (in the GEMMs' dtype)
and the weight's (in float32): the size of the weight, against the logits' tokens × vocab.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from dsv3.model.autograd_output import fresh_output
from dsv3.model.gemv import compute_dtype

__all__ = ["IGNORE_INDEX", "chunk_loss_and_grad", "linear_cross_entropy"]

IGNORE_INDEX = -100  # a target that counts in no loss (padding, a document's last position)

ChunkFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def chunk_loss_and_grad(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ cross-entropy of logits (m, V) against targets (m,) in float32, and its gradient with respect
    to the logits in their dtype (0 on ignored rows). Element-wise: one fused kernel when compiled."""
    x = logits.float()
    valid = targets != IGNORE_INDEX
    safe = torch.where(valid, targets, 0).unsqueeze(1)
    lse = torch.logsumexp(x, dim=1, keepdim=True)
    loss = torch.where(valid, (lse - x.gather(1, safe)).squeeze(1), 0.0).sum()
    one_hot = torch.arange(x.shape[1], device=x.device) == safe
    grad = torch.where(valid.unsqueeze(1), torch.exp(x - lse) - one_hot.float(), 0.0)
    return loss, grad.to(logits.dtype)


def _accumulate(total: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """total + a @ b in float32; a bf16 product accumulates into float32 inside the GEMM on CUDA."""
    if a.dtype == torch.float32:
        return a @ b if total is None else total.addmm_(a, b)
    if a.is_cuda:
        return (torch.mm(a, b, out_dtype=torch.float32) if total is None
                else torch.addmm(total, a, b, out_dtype=torch.float32))
    product = (a @ b).float()
    return product if total is None else total.add_(product)


class _LinearCrossEntropy(torch.autograd.Function):
    """Σ cross-entropy of h @ weightᵀ; the forward computes the gradients, the backward scales them."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_tokens: int, chunk_fn: ChunkFn):
        dtype = compute_dtype(h)  # autocast's, as the head's `nn.Linear` would run in
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(h.device.type, enabled=False):
            x, w = h.to(dtype), weight.to(dtype)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            grad_h = torch.empty_like(x) if want_h else None
            grad_w = None
            for start in range(0, x.shape[0], chunk_tokens):
                rows = slice(start, start + chunk_tokens)
                loss, grad = chunk_fn(x[rows] @ w.t(), targets[rows])
                total = total + loss
                if want_h:
                    grad_h[rows] = grad @ w
                if want_w:
                    grad_w = _accumulate(grad_w, grad.t(), x[rows])
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = h.dtype, weight.dtype
        return fresh_output(total)

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        dh = (grad_h * grad_total).to(h_dtype) if grad_h is not None else None
        dw = (grad_w * grad_total).to(w_dtype) if grad_w is not None else None
        return dh, dw, None, None, None


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
    chunk_fn: ChunkFn = chunk_loss_and_grad,
) -> torch.Tensor:
    """Mean cross-entropy of `F.linear(h, weight)` (h (…, d), weight (V, d)) against targets (…),
    IGNORE_INDEX skipped, computed `chunk_tokens` positions at a time (see the module docstring);
    `chunk_fn`: `chunk_loss_and_grad`, compiled or not. 0, not NaN, when every target is ignored."""
    h, targets = h.flatten(0, -2), targets.flatten()
    if h.shape[0] != targets.shape[0]:
        raise ValueError(f"linear_cross_entropy: {h.shape[0]} hidden states for {targets.shape[0]} targets")
    count = (targets != IGNORE_INDEX).sum().clamp(min=1)
    if not torch.is_grad_enabled() or not (h.requires_grad or weight.requires_grad):
        total = sum(
            F.cross_entropy(F.linear(h[s : s + chunk_tokens], weight).float(), targets[s : s + chunk_tokens],
                            ignore_index=IGNORE_INDEX, reduction="sum")
            for s in range(0, h.shape[0], chunk_tokens)
        )
        return total / count
    return _LinearCrossEntropy.apply(h, weight, targets, chunk_tokens, chunk_fn) / count
