"""Expert parallelism without a host sync: every rank sees all of its group's tokens (all-gather).

The all-to-all dispatcher (expert.py) sends only the rows a rank needs, but the sizes of those
messages depend on the routing, so the host must read the counts before it can post the exchange:
once per MoE layer, in the forward of every micro-batch. While it waits, the GPU runs dry. This
dispatcher has only fixed-size messages, so the host never waits:

  1. all-gathers the group's tokens (in the experts' dtype) and their routing (weights and expert ids);
  2. every rank sorts the group's (token, slot) pairs with its own experts first, grouped by expert,
     the others last, and runs them through its experts with grouped GEMMs whose offsets end at its
     last pair; the ops between (the gather into expert order, SwiGLU's product) stop there too
     (bounded_rows.py: the bound is read on the GPU), so the rows past it are never computed;
  3. sums each token's slots on this rank's experts (their combine weights applied inside SwiGLU, as
     one process does) into a partial sum (reading no row past the bound) and reduce-scatters the
     partial sums: each rank gets its own tokens, summed over the group.

The backward is the mirror image (reduce-scatter of the token gradients, all-gather of the output
gradients), in the experts' dtype like the forward: each rank's partial token gradients are summed in
float32 and rounded once to bf16 to travel (under autocast). That halves the largest exchange, for
one bf16 rounding of a sum of bf16 GEMM outputs (the all-to-all dispatcher sends them in float32).
The traffic per rank is the group's tokens, (ep − 1)/ep of them from others, which for ep = 2 is
what the all-to-all sends anyway (with k = 6 of 64 experts, nearly every token has an expert on the
other rank); it grows with ep, so this suits expert parallelism inside a node. Its buffers are sized
for the group's (token, slot) rows, ep times the local path's, since the host never learns how many
are this rank's: more memory, the price of never stopping it (on CPU ranks the bounded ops run as
torch code over every row, with the same results).

Nothing in one dispatch can run while its exchanges do: each step needs the one before. With
`chunks` > 1 the tokens go through in slices, one dispatch after another; the slices are independent,
so a compiler that reorders collectives (Inductor's compute-communication reordering, which
`parallel.ep_chunks` turns on for compiled GPU blocks) can start one slice's all-gather before
another slice's experts and wait for a reduce-scatter after them: DeepSeek-V3's overlap of
communication with computation, within a layer. The results are the unchunked ones up to the order
of float32 sums.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from dsv3.model.autograd_output import fresh_output
from dsv3.model.gemv import compute_dtype
from dsv3.model.moe import expert_ffn
from dsv3.model.moe_ops import inverse_permutation, sort_by_expert
from dsv3.parallel.bounded_rows import (
    bounded_gather,
    bounded_reduce,
    bounded_swiglu,
    bounded_swiglu_backward,
)

__all__ = ["AllGatherDispatcher"]


class _AllGather(torch.autograd.Function):
    """x (N, ...) → the group's (R·N, ...), rank-major; the backward reduce-scatters the gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return fresh_output(_all_gather(x, group))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _reduce_scatter(grad, ctx.group), None


class _ReduceScatter(torch.autograd.Function):
    """The group's (R·N, ...) → this rank's rows (N, ...) summed over the group; the backward all-gathers."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return fresh_output(_reduce_scatter(x, group))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_gather(grad, ctx.group), None


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    out = x.new_empty(dist.get_world_size(group) * x.shape[0], *x.shape[1:])
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def _reduce_scatter(x: torch.Tensor, group) -> torch.Tensor:
    out = x.new_empty(x.shape[0] // dist.get_world_size(group), *x.shape[1:])
    dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
    return out


class _GatherDispatch(torch.autograd.Function):
    """x (N, d) → the group's (token, slot) rows in expert order (R·N·k, d), in the experts' dtype; the
    rows past `bound` (other ranks' pairs) are left unspecified.

    Forward: x is cast to `dtype` (bf16 under autocast), all-gathered, and row p of the result is token
    token[p]'s. Backward: each token's local slots' gradients (`position` (R·N, k): a slot's row) are
    summed in float32, the rows past the bound never read, and the sums reduce-scattered to the
    tokens' ranks in `dtype`.
    """

    @staticmethod
    def forward(ctx, x, token, position, bound, group, dtype) -> torch.Tensor:
        ctx.save_for_backward(position, bound)
        ctx.group, ctx.x_dtype = group, x.dtype
        return bounded_gather(_all_gather(x.to(dtype), group), token, bound)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        position, bound = ctx.saved_tensors
        per_token = bounded_reduce(grad, position, bound, grad.dtype)
        return _reduce_scatter(per_token, ctx.group).to(ctx.x_dtype), None, None, None, None, None


class _SwiGLU(torch.autograd.Function):
    """w · silu(gate) · up of the rows below `bound` (gate_up (P, 2I), w (P, 1) → (P, I)): each pair's
    combine weight applied inside the activation, as one process does; the rest unspecified. The
    weights' gradient is 0 past the bound (other ranks' pairs)."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor, w: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate_up, w, bound)
        return bounded_swiglu(gate_up, w, bound)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate_up, w, bound = ctx.saved_tensors
        d_gate_up, dw = bounded_swiglu_backward(gate_up, w, grad, bound)
        return d_gate_up, dw, None


class _Combine(torch.autograd.Function):
    """The experts' weighted rows in expert order ys (P, d) → each group token's sum over its local
    slots (R·N, d), in float32; rows past `bound` are never read. Backward: row p's gradient is its
    token's (rows below the bound only)."""

    @staticmethod
    def forward(ctx, ys, pair_order, position, bound) -> torch.Tensor:
        ctx.save_for_backward(pair_order, bound)
        ctx.k = position.shape[1]
        return bounded_reduce(ys, position, bound, ys.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        pair_order, bound = ctx.saved_tensors
        return bounded_gather(grad, pair_order // ctx.k, bound), None, None, None


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's slice of an expert-sharded weight (the tensor itself where it is not a DTensor)."""
    return t.to_local() if isinstance(t, DTensor) else t


class AllGatherDispatcher:
    """The experts of this rank's slice, fed the whole group's tokens (see the module docstring),
    `chunks` slices of the tokens at a time."""

    def __init__(self, group: dist.ProcessGroup, n_experts: int, chunks: int = 1) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.local = n_experts // dist.get_world_size(group)  # experts per rank
        self.chunks = chunks

    def __call__(
        self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, order: torch.Tensor,
        ends: torch.Tensor, experts: nn.Module,
    ) -> torch.Tensor:
        """x (N, d), combine weights and expert ids (N, k) → Σ_k weight·expert(x) (N, d). Every rank
        holds the same N, so the chunks line up across the group."""
        if self.chunks == 1:
            return self._dispatch(x, weights, indices, experts)
        n = self.chunks
        pieces = zip(x.chunk(n), weights.chunk(n), indices.chunk(n), strict=True)
        return torch.cat([self._dispatch(*piece, experts) for piece in pieces])

    def _dispatch(
        self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, experts: nn.Module
    ) -> torch.Tensor:
        El, k = self.local, indices.shape[1]
        # weights and ids in one message (ids < 2^24 are exact in float32); the ids get no gradient
        routing = _AllGather.apply(torch.cat([weights.float(), indices.float()], 1), self.group)
        expert = routing[:, k:].long() - self.rank * El  # (R·N, k) local expert ids, others out of range
        mine = (expert >= 0) & (expert < El)
        # the (token, slot) pairs grouped by local expert, the others' slots (id El) last: only the
        # first `bound` rows (this rank's pairs) are ever computed, by the GEMMs and by every op between
        pair_order, local_ends = sort_by_expert(torch.where(mine, expert, El), El)
        position = inverse_permutation(pair_order).view(-1, k)  # each (token, slot)'s row
        bound = local_ends[-1]
        xs = _GatherDispatch.apply(x, pair_order // k, position, bound, self.group, compute_dtype(x))
        pair_weight = routing[:, :k].to(weights.dtype).reshape(-1, 1).index_select(0, pair_order)
        ys = expert_ffn(xs, local_ends, local_part(experts.gate_up_proj), local_part(experts.down_proj),
                        experts.matmul, activation=lambda h: _SwiGLU.apply(h, pair_weight, bound))
        partial = _Combine.apply(ys, pair_order, position, bound)
        return _ReduceScatter.apply(partial, self.group)
