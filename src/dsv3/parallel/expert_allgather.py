"""Expert parallelism without a host sync: every rank sees all of its group's tokens (all-gather).

The all-to-all dispatcher (expert.py) sends only the rows a rank needs, but the sizes of those
messages depend on the routing, so the host must read the counts before it can post the exchange:
once per MoE layer, in the forward of every micro-batch. While it waits, the GPU runs dry. This
dispatcher has only fixed-size messages, so the host never waits:

  1. all-gathers the group's tokens (in the experts' dtype) and their routing (weights and expert ids);
  2. every rank sorts the group's (token, slot) pairs with its own experts first, grouped by expert,
     the others last, and runs them through its experts with grouped GEMMs whose offsets end at its
     last pair: the rows past it are never computed (the kernels leave whatever was in memory there,
     which is masked out of the result and out of the gradients);
  3. sums each token's slots with their weights (0 for the other ranks' experts) into a partial sum and
     reduce-scatters the partial sums: each rank gets its own tokens, summed over the group.

The backward is the mirror image (reduce-scatter of the token gradients in float32, all-gather of the
output gradients). The traffic per rank is the group's tokens, (ep − 1)/ep of them from others, which for
ep = 2 is what the all-to-all sends anyway (with k = 6 of 64 experts, nearly every token has an expert on
the other rank); it grows with ep, so this suits expert parallelism inside a node. It also gathers ep
times the local path's (token, slot) rows before its GEMMs skip the others' ones: more copying and
memory, the price of never stopping the host.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from dsv3.model.gemv import compute_dtype
from dsv3.model.moe import expert_ffn
from dsv3.model.moe_ops import gather_rows, inverse_permutation, sort_by_expert, weighted_sum

__all__ = ["AllGatherDispatcher"]


class _AllGather(torch.autograd.Function):
    """x (N, ...) → the group's (R·N, ...), rank-major; the backward reduce-scatters the gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _all_gather(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _reduce_scatter(grad, ctx.group), None


class _ReduceScatter(torch.autograd.Function):
    """The group's (R·N, ...) → this rank's rows (N, ...) summed over the group; the backward all-gathers."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _reduce_scatter(x, group)

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
    """x (N, d) → the group's (token, slot) rows in expert order (R·N·k, d), in the experts' dtype.

    Forward: x is cast to `dtype` (bf16 under autocast), all-gathered, and its rows read by `index`
    (each token `fold` times). Backward: the gradients of rows past the last local pair (`valid` false:
    whatever the GEMM kernels left there) are dropped, each token's `fold` copies are summed in float32
    (by the inverse permutation, no atomics) and the sums reduce-scattered to the tokens' ranks.
    """

    @staticmethod
    def forward(ctx, x, index, inverse, valid, fold, group, dtype) -> torch.Tensor:
        ctx.save_for_backward(inverse, valid)
        ctx.fold, ctx.group, ctx.x_dtype = fold, group, x.dtype
        return _all_gather(x.to(dtype), group).index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        inverse, valid = ctx.saved_tensors
        grad = torch.where(valid, grad, 0).index_select(0, inverse)
        per_token = grad.view(-1, ctx.fold, grad.shape[-1]).sum(1, dtype=torch.float32)
        return _reduce_scatter(per_token, ctx.group).to(ctx.x_dtype), None, None, None, None, None, None


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's slice of an expert-sharded weight (the tensor itself where it is not a DTensor)."""
    return t.to_local() if isinstance(t, DTensor) else t


class AllGatherDispatcher:
    """The experts of this rank's slice, fed the whole group's tokens (see the module docstring)."""

    def __init__(self, group: dist.ProcessGroup, n_experts: int) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.local = n_experts // dist.get_world_size(group)  # experts per rank

    def __call__(
        self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, order: torch.Tensor,
        ends: torch.Tensor, experts: nn.Module,
    ) -> torch.Tensor:
        """x (N, d), combine weights and expert ids (N, k) → Σ_k weight·expert(x) (N, d)."""
        El, k = self.local, indices.shape[1]
        # weights and ids in one message (ids < 2^24 are exact in float32); the ids get no gradient
        routing = _AllGather.apply(torch.cat([weights.float(), indices.float()], 1), self.group)
        expert = routing[:, k:].long() - self.rank * El  # (R·N, k) local expert ids, others out of range
        mine = (expert >= 0) & (expert < El)
        # the (token, slot) pairs grouped by local expert, the others' slots (id El) last
        pair_order, local_ends = sort_by_expert(torch.where(mine, expert, El), El)
        inverse = inverse_permutation(pair_order)
        valid = (torch.arange(pair_order.numel(), device=x.device) < local_ends[-1]).unsqueeze(1)
        xs = _GatherDispatch.apply(x, pair_order // k, inverse, valid, k, self.group, compute_dtype(x))
        ys = expert_ffn(xs, local_ends, local_part(experts.gate_up_proj), local_part(experts.down_proj),
                        experts.matmul)
        ys = torch.where(valid, ys, 0)  # the rows past the last local pair were never computed
        ys = gather_rows(ys, inverse, pair_order, 1).view(-1, k, ys.shape[-1])  # (R·N, k, d)
        partial = weighted_sum(torch.where(mine, routing[:, :k], 0).to(weights.dtype), ys)  # (R·N, d)
        return _ReduceScatter.apply(partial, self.group)
