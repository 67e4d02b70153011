"""Expert parallelism: the routed experts split over `ep` ranks, tokens sent to them with all-to-all.

`apply_ep` turns each MoE layer's stacked expert weights into DTensors sharded on the expert dim over
the ep mesh (rank j holds experts [j·E/ep, (j+1)·E/ep)) and installs an `AllToAllDispatcher`. A token
travels once to each rank that holds one of its k experts, not once per expert (DeepSeek-V3 sends a
token once per node for the same reason): with k = 6 experts on 2 ranks that is ~2 rows a token
instead of 6, in both directions of the forward and of the backward. Per MoE forward:

  1. exchanges counts: one all_to_all of, per destination rank, the rows sent and the (row, expert)
     pairs they carry for each of its experts (one host sync turns them into split sizes);
  2. dispatches: one all_to_all_single of the rows, carrying the local expert ids and combine weights
     of the slots each row has on its destination (−1 / 0 for the others) as extra columns;
  3. runs each received row through its local experts (grouped GEMMs over the (row, expert) pairs
     sorted by expert) and sums them with their weights, in float32, into one row;
     rows travel in the experts' dtype (bf16 under autocast), their gradients back in float32;
  4. combines: the reverse all_to_all_single sends each row's partial sum back, and the token's rank
     adds up the partial sums of its ranks.

Every all-to-all of rows is an autograd function whose backward is the opposite exchange: three
exchanges a layer forward (counts, dispatch, combine) and two backward.
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

from dsv3.model.autograd_output import fresh_output
from dsv3.model.gemv import compute_dtype
from dsv3.model.moe import MoE, expert_ffn
from dsv3.model.moe_ops import pair_sum
from dsv3.model.swiglu import weighted_swiglu
from dsv3.parallel.expert_allgather import AllGatherDispatcher, local_part

__all__ = ["AllToAllDispatcher", "DISPATCHERS", "apply_ep"]


class _AllToAll(torch.autograd.Function):
    """Rows of x (Σ in_sizes, d) → (Σ out_sizes, d) over `group`; the backward sends gradients back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_sizes: list[int], in_sizes: list[int], group) -> torch.Tensor:
        ctx.sizes, ctx.group = (out_sizes, in_sizes), group
        out = x.new_empty(sum(out_sizes), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_sizes, in_sizes, group=group)
        return fresh_output(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_sizes, in_sizes = ctx.sizes
        back = grad.new_empty(sum(in_sizes), *grad.shape[1:])
        dist.all_to_all_single(back, grad.contiguous(), in_sizes, out_sizes, group=ctx.group)
        return back, None, None, None


class _Dispatch(torch.autograd.Function):
    """Sends rows with their routing in one message; returns this rank's (row, expert) inputs.

    Forward: the sent rows `token` (S,) of x, cast to `dtype` (bf16 under autocast: half the bytes of
    float32 rows), travel with their slots' combine weights (float32) and local expert ids (int32),
    both reinterpreted bit for bit as `dtype` columns, in one all_to_all_single (send sizes
    `in_sizes`, receive `out_sizes`). The received rows' (row, local expert) pairs are sorted by
    expert, the other ranks' slots last, and the first `n_pairs` read out. Returns the pairs' inputs
    (P, d), the received combine weights (M, k) and each pair's row · k + slot (P,).
    Backward: the pairs' gradients are summed per row in float32 (the sums autograd would form through
    float32 rows) and go back with the weights' gradients in one message, then add up per token.
    """

    @staticmethod
    def forward(ctx, x, slot_weight, token, local_expert, n_pairs, out_sizes, in_sizes, group, dtype, El):
        d, k = x.shape[1], slot_weight.shape[1]
        routing = torch.cat([slot_weight.float(), local_expert.to(torch.int32).view(torch.float32)], 1)
        send = torch.cat([x.to(dtype).index_select(0, token), routing.view(dtype)], 1)
        received = send.new_empty(sum(out_sizes), send.shape[1])
        dist.all_to_all_single(received, send, out_sizes, in_sizes, group=group)
        # slices, not `split`: torch 2.11's Dynamo keeps the split's symbolic row count as an output
        # of this Function's traced forward and then fails an assertion matching the outputs, once
        # the block recompiles for new split sizes (seen on CPU ranks; 2.13 traces either)
        rows, routing = received[:, :d], received[:, d:]
        routing = routing.contiguous().view(torch.float32)
        w_in, e_in = routing[:, :k], routing[:, k:].contiguous().view(torch.int32)
        key = torch.where(e_in >= 0, e_in, El).view(-1)  # (M·k,) the others' slots sort last
        pair_slot = key.argsort(stable=True)[:n_pairs]  # (P,) grouped by local expert
        row = pair_slot // k
        ctx.save_for_backward(token, row)
        ctx.sizes, ctx.group, ctx.x_shape = (out_sizes, in_sizes), group, x.shape
        ctx.dtypes = x.dtype, slot_weight.dtype
        ctx.mark_non_differentiable(pair_slot)
        return rows.index_select(0, row), fresh_output(w_in.to(slot_weight.dtype).contiguous()), pair_slot

    @staticmethod
    def backward(ctx, grad_xs: torch.Tensor, grad_w: torch.Tensor, _):
        token, row = ctx.saved_tensors
        out_sizes, in_sizes = ctx.sizes
        d = grad_xs.shape[1]
        per_row = grad_xs.new_zeros(sum(out_sizes), d + grad_w.shape[1], dtype=torch.float32)
        per_row[:, :d].index_add_(0, row, grad_xs.float())
        per_row[:, d:] = grad_w
        back = per_row.new_empty(sum(in_sizes), per_row.shape[1])
        dist.all_to_all_single(back, per_row, in_sizes, out_sizes, group=ctx.group)
        grad_x = back.new_zeros(ctx.x_shape).index_add_(0, token, back[:, :d])
        x_dtype, w_dtype = ctx.dtypes
        return grad_x.to(x_dtype), back[:, d:].to(w_dtype), None, None, None, None, None, None, None, None


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

        xs, w_in, by_expert = _Dispatch.apply(  # (P, d), (M, k), (P,)
            x, slot_weight, token, local_expert, n_pairs, recv_sizes, send_sizes, self.group,
            compute_dtype(x), El)
        local_ends = recv[:, 1:].sum(0).cumsum(0)  # (El,)
        pair_weight = w_in.reshape(-1, 1).index_select(0, by_expert)  # (P, 1) each pair's combine weight
        ys = expert_ffn(xs, local_ends, local_part(experts.gate_up_proj), local_part(experts.down_proj),
                        experts.matmul, activation=lambda h: weighted_swiglu(h, pair_weight))
        # The weights applied inside SwiGLU, as one process does; one float32 sum per received row over
        # its slots in a fixed order (a slot whose expert is elsewhere has no pair).
        partial = pair_sum(ys, by_expert, w_in.shape[0], w_in.shape[1])  # (M, d)

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


def apply_ep(moe_layers: list[MoE], mesh: DeviceMesh, dispatch: str = "all_to_all", chunks: int = 1) -> None:
    """Split every MoE layer's routed experts over the expert-parallel `mesh`; tokens reach them by
    `dispatch` (a key of DISPATCHERS), the all-gather one in `chunks` pieces."""
    if chunks > 1 and dispatch != "all_gather":
        raise ValueError(f"{chunks} dispatch chunks need the all_gather dispatch, not {dispatch}")
    options = {"chunks": chunks} if dispatch == "all_gather" else {}
    for moe in moe_layers:
        experts = moe.experts
        experts.gate_up_proj = _shard_experts(experts.gate_up_proj, mesh)
        experts.down_proj = _shard_experts(experts.down_proj, mesh)
        experts.dispatcher = DISPATCHERS[dispatch](mesh.get_group(), moe.n_experts, **options)
