"""Tensor parallelism with DTensor's `parallelize_module`: attention heads and dense/shared FFN widths.

Per block, Megatron's pairing keeps one all-reduce per sub-layer: MLA's q_b_proj (or q_proj) and kv_b_proj
are split by output column, so each tp rank computes H/tp heads from the whole (replicated) input, and
o_proj is split by input row, its partial sums all-reduced. The dense FFN and the shared experts split
gate/up by column and down by row. The low-rank projections (q_a, kv_a), norms, router and routed
experts stay whole on every tp rank: they are small, or (routed experts) the job of expert parallelism.

One tensor needs care: MLA's rope key k_pe is shared by all heads, so each tp rank's heads give only
part of its gradient. A hook on kv_a_proj_with_mqa sums that slice of the gradient over the tp ranks
(c_kv's gradient arrives already summed through kv_b_proj's column split).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from dsv3.model.moe import MLP, MoE

__all__ = ["apply_tp"]

_SWIGLU_PLAN = {"gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel(), "down_proj": RowwiseParallel()}


class _SumRopeKeyGrad(torch.autograd.Function):
    """Identity on the latent (…, kv_lora_rank + rope); backward sums the rope slice over `group`."""

    @staticmethod
    def forward(ctx, latent: torch.Tensor, rope: int, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.rope, ctx.group = rope, group
        return latent.view_as(latent)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        k_pe = grad[..., -ctx.rope :].contiguous()
        dist.all_reduce(k_pe, group=ctx.group)
        grad[..., -ctx.rope :] = k_pe
        return grad, None, None


def apply_tp(blocks: list[nn.Module], mesh: DeviceMesh) -> None:
    """Split each block's attention heads and dense/shared FFN over the tensor-parallel `mesh`."""
    tp = mesh.size()
    for block in blocks:
        attn = block.self_attn
        q = "q_proj" if attn.q_lora_rank is None else "q_b_proj"
        parallelize_module(attn, mesh, {q: ColwiseParallel(), "kv_b_proj": ColwiseParallel(),
                                        "o_proj": RowwiseParallel()})
        attn.n_heads //= tp  # the heads this rank computes: the views in MLA use the local count
        group, rope = mesh.get_group(), attn.qk_rope_head_dim
        attn.kv_a_proj_with_mqa.register_forward_hook(
            lambda module, args, out, rope=rope, group=group: _SumRopeKeyGrad.apply(out, rope, group)
        )
        ffn = block.mlp.shared_experts if isinstance(block.mlp, MoE) else block.mlp
        if isinstance(ffn, MLP):
            parallelize_module(ffn, mesh, dict(_SWIGLU_PLAN))
