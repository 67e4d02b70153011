"""Tensor parallelism with DTensor's `parallelize_module`: attention heads and dense/shared FFN widths.

Per block, Megatron's pairing keeps one all-reduce per sub-layer: MLA's q_b_proj (or q_proj) and kv_b_proj
are split by output column, so each tp rank computes H/tp heads from the whole (replicated) input, and
o_proj is split by input row, its partial sums all-reduced. The dense FFN and the shared experts split
gate/up by column and down by row. The low-rank projections (q_a, kv_a), norms, router and routed
experts stay whole on every tp rank: they are small, or (routed experts) the job of expert parallelism.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from dsv3.model.moe import MLP, MoE

__all__ = ["apply_tp"]

_SWIGLU_PLAN = {"gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel(), "down_proj": RowwiseParallel()}


def apply_tp(blocks: list[nn.Module], mesh: DeviceMesh) -> None:
    """Split each block's attention heads and dense/shared FFN over the tensor-parallel `mesh`."""
    tp = mesh.size()
    for block in blocks:
        attn = block.self_attn
        q = "q_proj" if attn.q_lora_rank is None else "q_b_proj"
        parallelize_module(attn, mesh, {q: ColwiseParallel(), "kv_b_proj": ColwiseParallel(),
                                        "o_proj": RowwiseParallel()})
        attn.n_heads //= tp  # the heads this rank computes: the views in MLA use the local count
        ffn = block.mlp.shared_experts if isinstance(block.mlp, MoE) else block.mlp
        if isinstance(ffn, MLP):
            parallelize_module(ffn, mesh, dict(_SWIGLU_PLAN))
