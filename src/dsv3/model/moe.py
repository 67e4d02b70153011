"""DeepSeekMoE: a sigmoid router with group-limited top-k, shared experts, stacked routed experts.

Routing (`route`) is a pure function: sigmoid scores; `e_score_correction_bias` is added for the
choice of experts only; the n_group groups are ranked by the sum of their two best biased scores
and only the topk_group best stay eligible; the top-k weights (unbiased scores) are normalized when
norm_topk_prob and multiplied by routed_scaling_factor.

The routed experts are two stacked tensors, `gate_up_proj` (E, 2I, d) and `down_proj` (E, d, I), the
layout transformers uses in memory (hf.py splits them into the published per-expert tensors).
Tokens are sorted by expert and run through `torch.nn.functional.grouped_mm` with device-side
offsets: no Python loop over experts and no host sync on the forward path.

Where the expert weights live is the `Experts.dispatcher`'s business: the default runs every expert
in this process; `dsv3.parallel` swaps in one that sends each token to the expert-parallel ranks
holding its experts (all-to-all) and brings the results back, so the model never sees a process group.

Each MoE layer keeps `tokens_per_expert` of its last forward, so the trainer can apply the
auxiliary-loss-free balancing update (`MoE.update_bias`, b_i += γ·sign(mean load − load_i)).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model.gemv import Linear, compute_dtype, linear
from dsv3.model.moe_ops import (
    expert_counts,
    expert_matmul,
    gather_rows,
    gathered_expert_ffn,
    inverse_permutation,
    router_logits,
    sort_by_expert,
    sum_rows,
)
from dsv3.model.packing import pack_linears, packed_weight
from dsv3.model.swiglu import swiglu, weighted_swiglu

__all__ = [
    "MLP", "route", "sequence_balance_loss", "expert_ffn", "ExpertDispatcher", "LocalDispatcher", "Gate",
    "Experts", "MoE", "indexed_expert_tokens",
]


class MLP(nn.Module):
    """SwiGLU feed-forward: the dense layers and the shared experts."""

    def __init__(self, dim: int, inter_dim: int) -> None:
        super().__init__()
        self.gate_proj = Linear(dim, inter_dim)
        self.up_proj = Linear(dim, inter_dim)
        self.down_proj = Linear(inter_dim, dim)
        self.packed_gate_up: torch.Tensor | None = None  # `pack_inputs`: gate and up as one weight

    def pack_inputs(self) -> None:
        """Inference: gate and up as one GEMM (dsv3.model.packing)."""
        self.packed_gate_up = pack_linears(self.gate_proj, self.up_proj, packed=self.packed_gate_up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = packed_weight(self.packed_gate_up)
        if packed is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = linear(x, packed).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


# --------------------------------------------------------------------------------------------
# Routing math (pure functions)
# --------------------------------------------------------------------------------------------


def route(
    logits: torch.Tensor,
    bias: torch.Tensor,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router logits (N, E) → scores (N, E), combine weights (N, k), expert indices (N, k)."""
    scores = logits.sigmoid()
    choice = scores + bias  # the bias steers selection only
    # Top-k as a sort of each row: torch.compile turns a sort of a few dozen values per row into one
    # fused kernel (measured 4× faster than torch.topk on an H200); exact ties pick arbitrarily in both.
    if n_group > 1 and topk_group < n_group:
        N, E = choice.shape
        grouped = choice.view(N, n_group, E // n_group)
        group_scores = grouped.sort(dim=-1, descending=True).values[..., :2].sum(-1)  # (N, n_group)
        kept = group_scores.argsort(dim=-1, descending=True)[:, :topk_group]  # (N, topk_group)
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        choice = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(N, E)
    indices = choice.argsort(dim=-1, descending=True)[:, :top_k]  # (N, k)
    weights = scores.gather(1, indices)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return scores, weights * routed_scaling_factor, indices


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss Σ_i f_i·P_i per sequence (B,), without α.

    scores (B, T, E) sigmoid scores, indices (B, T, k) chosen experts. f_i = E/(k·T)·(tokens routed
    to i), P_i = mean over the sequence of the scores normalized to sum 1. Equals 1 when balanced.
    """
    B, T, E = scores.shape
    k = indices.shape[-1]
    hits = torch.zeros(B, E, device=scores.device, dtype=scores.dtype)
    hits.scatter_add_(
        1, indices.reshape(B, T * k), torch.ones_like(indices.reshape(B, T * k), dtype=scores.dtype)
    )
    f = hits * (E / (k * T))
    p = (scores / scores.sum(-1, keepdim=True)).mean(1)  # (B, E)
    return (f * p).sum(-1)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class Gate(nn.Module):
    """The router: weight (E, d) and the selection bias (a float32 buffer: it is learned by the
    balancing rule, not by gradients, and must keep γ-sized steps that bf16 would round away)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.routed_scaling_factor = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, d) → scores (N, E), weights (N, k), indices (N, k); computed in float32."""
        with torch.autocast(x.device.type, enabled=False):
            logits = router_logits(x, self.weight)
        return route(
            logits,
            self.e_score_correction_bias,
            self.top_k,
            self.n_group,
            self.topk_group,
            self.norm_topk_prob,
            self.routed_scaling_factor,
        )

    def _apply(self, fn, recurse=True):
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        if self.e_score_correction_bias.dtype != torch.float32:  # model.to(bf16): keep the bias exact
            self.e_score_correction_bias = bias.to(self.e_score_correction_bias.device, torch.float32)
        return self


def expert_ffn(
    xs: torch.Tensor, ends: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
    matmul: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = expert_matmul,
    activation: Callable[[torch.Tensor], torch.Tensor] = swiglu,
) -> torch.Tensor:
    """Rows sorted by expert (M, d), each expert's end offset (E,) → SwiGLU through its weights (M, d).
    `matmul`: the grouped product (`Experts.matmul`: bf16, or FP8 after `convert_to_fp8`);
    `activation`: `swiglu`, or the dispatchers' weighted one (each row's combine weight applied
    inside it: `dsv3.model.swiglu.weighted_swiglu`, or one that stops at the rows the GEMMs compute)."""
    return matmul(activation(matmul(xs, gate_up_proj, ends)), down_proj, ends)


class ExpertDispatcher(Protocol):
    """Runs each token through its k experts: x (N, d), combine weights and expert ids (N, k), and
    `sort_by_expert`'s order and ends of the (token, slot) pairs → Σ_k weight·expert(x) (N, d)."""

    def __call__(
        self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, order: torch.Tensor,
        ends: torch.Tensor, experts: Experts,
    ) -> torch.Tensor: ...


class LocalDispatcher:
    """Every expert lives in this process: the (token, slot) rows go through the stacked weights,
    each row's combine weight applied inside the activation (`weighted_swiglu`), so the combine is
    a sum and no expert output is kept for the backward."""

    def __call__(
        self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, order: torch.Tensor,
        ends: torch.Tensor, experts: Experts,
    ) -> torch.Tensor:
        k = weights.shape[1]
        inverse, token = inverse_permutation(order), order // k
        xs = gather_rows(x, token, inverse, k, compute_dtype(x))  # (N·k, d) sorted by expert
        w = gather_rows(weights.reshape(-1, 1), order, inverse, 1)  # (N·k, 1) each row's combine weight
        ys = expert_ffn(xs, ends, experts.gate_up_proj, experts.down_proj, experts.matmul,
                        activation=lambda h: weighted_swiglu(h, w))  # weighted rows
        return sum_rows(ys, inverse, token, k)  # back to tokens, each the sum of its k weighted rows


class Experts(nn.Module):
    """The routed experts, stacked: gate_up_proj (E, 2I, d) = [gate; up] per expert, down_proj (E, d, I)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        E, d, inter = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * inter, d))
        self.down_proj = nn.Parameter(torch.empty(E, d, inter))
        self.dispatcher: ExpertDispatcher = LocalDispatcher()
        self.matmul = expert_matmul  # the grouped product; `convert_to_fp8` makes it FP8's

    def forward(
        self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, order: torch.Tensor,
        ends: torch.Tensor,
    ) -> torch.Tensor:
        """x (N, d), weights and expert ids (N, k), `sort_by_expert`'s order, ends → Σ_k weight·expert(x)."""
        return self.dispatcher(x, weights, indices, order, ends, self)


def indexed_expert_tokens(cfg: ModelConfig) -> int:
    """The most tokens whose experts a forward without gradients runs by indexing the weights: their
    (token, slot) pairs are at most half the experts, so each pair reading its own expert's weights
    reads about what the grouped GEMMs would (they read each chosen expert once): a decode step of a
    few sequences. Prefill and larger batches keep the grouped path."""
    return cfg.n_routed_experts // 2 // cfg.num_experts_per_tok


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.indexed_tokens = indexed_expert_tokens(cfg)
        self.gate = Gate(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
            if cfg.n_shared_experts
            else None
        )
        # Tokens each expert received in the last forward (a recomputed forward writes the same).
        self.register_buffer(
            "tokens_per_expert", torch.zeros(cfg.n_routed_experts, dtype=torch.int64), persistent=False
        )

    def forward(self, x: torch.Tensor, balance: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, d) → (output (B, T, d), sequence-wise balance loss averaged over B, or None)."""
        B, T, d = x.shape
        flat = x.reshape(B * T, d)
        scores, weights, indices = self.gate(flat)
        indexed = self._few_pairs(indices)
        if indexed:
            counts = expert_counts(indices, self.n_experts)
        else:
            order, ends = sort_by_expert(indices, self.n_experts)
            counts = torch.diff(ends, prepend=ends.new_zeros(1))
        with torch.no_grad():
            self.tokens_per_expert.copy_(counts)
        # The shared expert first: under expert parallelism its GEMMs are queued on the GPU while the
        # host waits for the routed tokens' counts from the other ranks.
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        if indexed:
            e = self.experts
            y = gathered_expert_ffn(flat, weights, indices, e.gate_up_proj, e.down_proj).view(B, T, d)
        else:
            y = self.experts(flat, weights, indices, order, ends).view(B, T, d)
        if shared is not None:
            y = y + shared
        aux = sequence_balance_loss(scores.view(B, T, -1), indices.view(B, T, -1)).mean() if balance else None
        return y, aux

    def _few_pairs(self, indices: torch.Tensor) -> bool:
        """Whether to run the experts by indexing their weights (`gathered_expert_ffn`): a compiled
        forward that records no gradient (decoding), with every expert in this process, of at most
        `indexed_expert_tokens` tokens. Eagerly the indexed weights would be copied: grouped path."""
        return (
            not torch.is_grad_enabled()
            and torch.compiler.is_compiling()
            and isinstance(self.experts.dispatcher, LocalDispatcher)
            and indices.shape[0] <= self.indexed_tokens
        )

    @torch.no_grad()
    def update_bias(
        self, gamma: float, load: torch.Tensor | None = None, where: torch.Tensor | None = None
    ) -> None:
        """Aux-loss-free balancing b_i += γ·sign(mean load − load_i) (default load: the last forward's).
        `where`, a boolean scalar tensor, applies it only where true without reading it on the host (a
        skipped step moves no bias, and the GPU queue never waits for the flag)."""
        load = (self.tokens_per_expert if load is None else load).float()
        step = torch.sign(load.mean() - load)
        if where is not None:
            step = step * where
        self.gate.e_score_correction_bias.add_(step, alpha=gamma)
