"""Expert parallelism: the routed experts split over `ep` ranks, tokens sent to them with all-to-all.

`apply_ep` turns each MoE layer's stacked expert weights into DTensors sharded on the expert dim over
the ep mesh (rank j holds experts [j·E/ep, (j+1)·E/ep)) and installs an `AllToAllDispatcher`. Per MoE
forward the dispatcher, given rows already sorted by expert:

  1. exchanges counts: all_to_all of the per-expert row counts (E,), so each rank learns how many rows
     every other rank sends to each of its experts (one host sync turns them into split sizes);
  2. dispatches: all_to_all_single of the rows, arriving ordered by (source rank, local expert);
  3. reorders them by local expert, runs the local experts' grouped GEMMs, restores the order;
  4. combines: the reverse all_to_all_single sends each result back to the rank that owns the token.

Both all-to-alls are autograd functions whose backward is the opposite exchange. Another transport
(e.g. DeepEP's fused dispatch/combine kernels) slots in as another `ExpertDispatcher`: the model only
calls `dispatcher(xs, ends, experts)`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from dsv3.model.moe import MoE, expert_ffn
from dsv3.model.moe_ops import gather_rows

__all__ = ["AllToAllDispatcher", "apply_ep"]


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


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class AllToAllDispatcher:
    """The experts of this rank's slice; rows for other experts travel to their rank and back."""

    def __init__(self, group: dist.ProcessGroup, n_experts: int) -> None:
        self.group = group
        self.ranks = dist.get_world_size(group)
        self.local = n_experts // self.ranks  # experts per rank

    def __call__(self, xs: torch.Tensor, ends: torch.Tensor, experts: nn.Module) -> torch.Tensor:
        """xs (M, d) sorted by expert, ends (E,) → each row through its expert (M, d)."""
        R, El = self.ranks, self.local
        counts = torch.diff(ends, prepend=ends.new_zeros(1))  # (E,) rows per expert, from here
        recv = torch.empty_like(counts)  # (R·El,) rows from rank r for my expert j at r·El + j
        dist.all_to_all_single(recv, counts, group=self.group)
        send_sizes, recv_sizes = torch.stack([counts.view(R, El).sum(1), recv.view(R, El).sum(1)]).tolist()
        x_in = _AllToAll.apply(xs, recv_sizes, send_sizes, self.group)  # (M', d): by (source, expert)
        # Regroup by local expert: a stable sort keeps each expert's rows in source-rank order.
        expert = torch.arange(El, device=xs.device).repeat(R)
        row_expert = torch.repeat_interleave(expert, recv, output_size=sum(recv_sizes))
        order = row_expert.argsort(stable=True)
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        local_ends = recv.view(R, El).sum(0).cumsum(0)
        ys = expert_ffn(
            gather_rows(x_in, order, inverse, 1), local_ends,
            _local(experts.gate_up_proj), _local(experts.down_proj),
        )
        ys = gather_rows(ys, inverse, order, 1)  # back to (source, expert) order
        return _AllToAll.apply(ys, send_sizes, recv_sizes, self.group)  # (M, d)


def _shard_experts(param: nn.Parameter, mesh: DeviceMesh) -> nn.Parameter:
    """The rank's slice of a stacked (E, ...) expert tensor as a DTensor of the global shape."""
    rank, size = mesh.get_local_rank(), mesh.size()
    per_rank = param.shape[0] // size
    local = param.data[rank * per_rank : (rank + 1) * per_rank]
    return nn.Parameter(DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=param.shape,
                                           stride=param.stride()))


def apply_ep(moe_layers: list[MoE], mesh: DeviceMesh) -> None:
    """Split every MoE layer's routed experts over the expert-parallel `mesh`; tokens go by all-to-all."""
    for moe in moe_layers:
        experts = moe.experts
        experts.gate_up_proj = _shard_experts(experts.gate_up_proj, mesh)
        experts.down_proj = _shard_experts(experts.down_proj, mesh)
        experts.dispatcher = AllToAllDispatcher(mesh.get_group(), moe.n_experts)
