"""Expert parallelism: the routed experts split over `ep` ranks, tokens sent to them with all-to-all.

`apply_ep` turns each MoE layer's stacked expert weights into DTensors sharded on the expert dim over
the ep mesh (rank j holds experts [j·E/ep, (j+1)·E/ep)) and installs an `AllToAllDispatcher`. A token
travels once to each rank that holds one of its k experts, not once per expert (DeepSeek-V3 sends a
token once per node for the same reason): with k = 6 experts on 2 ranks that is ~2 rows a token
instead of 6, in both directions of the forward and of the backward. Per MoE forward:

  1. exchanges counts: one all_to_all of, per destination rank, the rows sent and the (row, expert)
     pairs they carry for each of its experts (one host sync turns them into split sizes);
  2. dispatches: all_to_all_single of the rows, with the local expert ids and combine weights of the
     slots each row has on its destination (−1 / 0 for the others);
  3. runs each received row through its local experts (grouped GEMMs over the (row, expert) pairs
     sorted by expert) and sums them with their weights, in float32, into one row;
     rows travel in the experts' dtype (bf16 under autocast), their gradients back in float32;
  4. combines: the reverse all_to_all_single sends each row's partial sum back, and the token's rank
     adds up the partial sums of its ranks.

Every all-to-all of rows or weights is an autograd function whose backward is the opposite exchange.
On a GPU the backward adds a row's expert gradients with atomic adds (and, with more than two ranks,
the forward a token's partial sums), so their last bits can differ between runs unless
`torch.use_deterministic_algorithms(True)`.
`parallel.ep_dispatch: all_gather` picks expert_allgather.py's dispatcher instead (no host sync, more
traffic). Another transport (e.g. DeepEP's fused dispatch/combine kernels) slots in as another
`ExpertDispatcher`: the model only calls `dispatcher(x, weights, indices, order, ends, experts)`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from dsv3.model.moe import MoE, expert_ffn
from dsv3.model.moe_ops import compute_dtype, pair_weighted_sum
from dsv3.parallel.expert_allgather import AllGatherDispatcher, local_part

__all__ = ["AllToAllDispatcher", "DISPATCHERS", "apply_ep"]


class _AllToAll(torch.autograd.Function):
    """Rows of x (Σ in_sizes, d) → (Σ out_sizes, d) over `group`; the backward sends gradients back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_sizes: list[int], in_sizes: list[int], group) -> torch.Tensor:
        ctx.sizes, ctx.group = (out_sizes, in_sizes), group
        out = x.new_empty(sum(out_sizes), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_sizes, in_sizes, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_sizes, in_sizes = ctx.sizes
        back = grad.new_empty(sum(in_sizes), *grad.shape[1:])
        dist.all_to_all_single(back, grad.contiguous(), in_sizes, out_sizes, group=ctx.group)
        return back, None, None, None


class _Dispatch(torch.autograd.Function):
    """x (N, d) → the (row, expert) inputs of this rank's experts (P, d), in the experts' dtype.

    Forward: x is cast to `dtype` (bf16 under autocast: half the bytes of float32 rows), its rows
    `token` (S,) go out with all_to_all_single (send sizes `in_sizes`, receive `out_sizes`), and the
    received rows are repeated as `row` (P,) says. Backward: the pairs' gradients are summed per row,
    sent back and summed per token in float32 — the sums autograd would form through float32 rows.
    """

    @staticmethod
    def forward(ctx, x, token, row, out_sizes, in_sizes, group, dtype) -> torch.Tensor:
        ctx.save_for_backward(token, row)
        ctx.sizes, ctx.group, ctx.x_shape, ctx.x_dtype = (out_sizes, in_sizes), group, x.shape, x.dtype
        send = x.to(dtype).index_select(0, token)
        received = send.new_empty(sum(out_sizes), x.shape[1])
        dist.all_to_all_single(received, send, out_sizes, in_sizes, group=group)
        return received.index_select(0, row)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        token, row = ctx.saved_tensors
        out_sizes, in_sizes = ctx.sizes
        per_row = grad.new_zeros(sum(out_sizes), grad.shape[1], dtype=torch.float32)
        per_row.index_add_(0, row, grad.float())
        back = per_row.new_empty(sum(in_sizes), grad.shape[1])
        dist.all_to_all_single(back, per_row, in_sizes, out_sizes, group=ctx.group)
        grad_x = back.new_zeros(ctx.x_shape).index_add_(0, token, back)
        return grad_x.to(ctx.x_dtype), None, None, None, None, None, None


class AllToAllDispatcher:
    """The experts of this rank's slice; each token travels once to every rank holding its experts."""

    def __init__(self, group: dist.ProcessGroup, n_experts: int) -> None:
        self.group = group
        self.ranks = dist.get_world_size(group)
        self.local = n_experts // self.ranks  # experts per rank

    def __call__(
        self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, order: torch.Tensor,
        ends: torch.Tensor, experts: nn.Module,
    ) -> torch.Tensor:
        """x (N, d), combine weights and expert ids (N, k) → Σ_k weight·expert(x) (N, d)."""
        R, El = self.ranks, self.local
        N, k = indices.shape
        dest = indices // El  # (N, k) the rank holding each slot's expert
        goes = torch.zeros(R, N, dtype=torch.bool, device=x.device)
        goes[dest.t().reshape(-1), torch.arange(N, device=x.device).repeat(k)] = True  # (R, N)
        pairs = torch.diff(ends, prepend=ends.new_zeros(1))  # (E,) (token, slot) pairs per expert
        counts = torch.cat([goes.sum(1, keepdim=True), pairs.view(R, El)], 1)  # (R, 1 + El) per destination
        recv = torch.empty_like(counts)  # per source rank: its rows for me, its pairs for each of my experts
        dist.all_to_all_single(recv, counts, group=self.group)
        sizes = torch.cat([counts[:, 0], recv[:, 0], recv[:, 1:].sum().view(1)]).tolist()
        send_sizes, recv_sizes, n_pairs = sizes[:R], sizes[R : 2 * R], sizes[-1]

        # The rows to send, grouped by destination (rank-major, token order within): the selected
        # (rank, token) entries of `goes`, found by a stable sort that puts them first.
        chosen = (~goes).view(-1).to(torch.uint8).argsort(stable=True)[: sum(send_sizes)]
        token, rank = chosen % N, chosen // N  # (S,) each sent row's token and destination
        mine = dest.index_select(0, token) == rank.unsqueeze(1)  # (S, k) its slots on that rank
        local_expert = torch.where(mine, indices.index_select(0, token) - (rank * El).unsqueeze(1), -1)
        slot_weight = weights.index_select(0, token) * mine  # (S, k), 0 for the other ranks' slots

        w_in = _AllToAll.apply(slot_weight, recv_sizes, send_sizes, self.group)  # (M, k)
        e_in = local_expert.new_empty(sum(recv_sizes), k)
        dist.all_to_all_single(e_in, local_expert, recv_sizes, send_sizes, group=self.group)

        # Each received row's (row, local expert) pairs, grouped by expert; the others' slots last.
        key = torch.where(e_in >= 0, e_in, El).view(-1)  # (M·k,)
        by_expert = key.argsort(stable=True)[:n_pairs]  # (P,) the pairs' (row · k + slot)
        row = by_expert // k
        local_ends = recv[:, 1:].sum(0).cumsum(0)  # (El,)
        xs = _Dispatch.apply(x, token, row, recv_sizes, send_sizes, self.group, compute_dtype(x))  # (P, d)
        ys = expert_ffn(xs, local_ends, local_part(experts.gate_up_proj), local_part(experts.down_proj))
        # One weighted sum per received row over its slots in a fixed order: the same float32 sum as
        # one process (a slot whose expert is elsewhere has weight 0 and no pair).
        partial = pair_weighted_sum(w_in, ys, by_expert)  # (M, d)

        back = _AllToAll.apply(partial, send_sizes, recv_sizes, self.group)  # (S, d) in send order
        out = torch.zeros(N, back.shape[1], dtype=torch.float32, device=back.device)
        return out.index_add(0, token, back.float()).to(back.dtype)  # (N, d): the token's ranks summed


def _shard_experts(param: nn.Parameter, mesh: DeviceMesh) -> nn.Parameter:
    """The rank's slice of a stacked (E, ...) expert tensor as a DTensor of the global shape."""
    rank, size = mesh.get_local_rank(), mesh.size()
    per_rank = param.shape[0] // size
    local = param.data[rank * per_rank : (rank + 1) * per_rank]
    return nn.Parameter(DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=param.shape,
                                           stride=param.stride()))


DISPATCHERS = {"all_to_all": AllToAllDispatcher, "all_gather": AllGatherDispatcher}


def apply_ep(moe_layers: list[MoE], mesh: DeviceMesh, dispatch: str = "all_to_all") -> None:
    """Split every MoE layer's routed experts over the expert-parallel `mesh`; tokens reach them by
    `dispatch` (a key of DISPATCHERS)."""
    for moe in moe_layers:
        experts = moe.experts
        experts.gate_up_proj = _shard_experts(experts.gate_up_proj, mesh)
        experts.down_proj = _shard_experts(experts.down_proj, mesh)
        experts.dispatcher = DISPATCHERS[dispatch](mesh.get_group(), moe.n_experts)
