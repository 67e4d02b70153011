"""FSDP2 (`fully_shard`) per block: bf16 compute on fp32 master weights, fp32 gradient reduction.

Each decoder block (and MTP block) is one FSDP unit, or `fsdp_unit_blocks` consecutive decoder blocks
are, gathered just before the unit's forward and freed after it (`reshard_after_forward`, ZeRO-3) or
kept until its backward (ZeRO-2-like); the rest (embedding, final norm, head) forms the root unit.
With expert parallelism the routed experts are already split over ep. Where other ranks hold copies
of the same experts (efsdp = dp_shard / ep > 1, replicas, or CPU offload) they are their own FSDP unit
on the expert mesh, sharded over efsdp (replicated over dp_replicate). Where each expert lives on
exactly one rank (ep = dp_shard, no replicas) FSDP leaves them alone (`ignored_params`): a unit on a
1-rank mesh only adds hooks that break a compiled block into pieces, a copy of every expert weight
each forward and 1-rank collectives; autocast casts them for the grouped GEMMs as in one process.
Either way their gradients arrive from every ep rank's tokens through the dispatch, so they are
divided by the whole data-parallel size, like every other gradient.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from dsv3.config import ParallelConfig
from dsv3.model.moe import MoE
from dsv3.parallel.mesh import Meshes
from dsv3.scaling.layout import reshards_after_forward

__all__ = ["apply_fsdp", "average_expert_gradients", "experts_outside_fsdp", "fsdp_units"]


def fsdp_units(blocks: list[nn.Module], main_blocks: int, per_unit: int) -> list[list[nn.Module]]:
    """The FSDP units: `per_unit` consecutive decoder blocks of the first `main_blocks` together, each
    later block (an MTP depth, run after the head) alone."""
    main, rest = blocks[:main_blocks], blocks[main_blocks:]
    return [main[i : i + per_unit] for i in range(0, len(main), per_unit)] + [[b] for b in rest]


def apply_fsdp(
    roots: list[nn.Module], units: list[list[nn.Module]], meshes: Meshes, cfg: ParallelConfig,
    param_dtype: torch.dtype | None,
) -> None:
    """Shard each unit of blocks (`fsdp_units`), then each of `roots` (the modules whose forward the
    trainer calls)."""
    common = {
        "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32),
        "offload_policy": CPUOffloadPolicy() if cfg.cpu_offload else OffloadPolicy(),
    }
    reshard = reshards_after_forward(cfg)
    for unit in units:
        ignored: set[nn.Parameter] = set()
        for block in unit:
            if isinstance(block.mlp, MoE) and experts_outside_fsdp(cfg):
                ignored |= set(block.mlp.experts.parameters())
            elif isinstance(block.mlp, MoE) and cfg.ep > 1:
                experts = fully_shard(block.mlp.experts, mesh=meshes.expert_fsdp,
                                      reshard_after_forward=reshard, **common)
                experts.set_gradient_divide_factor(float(cfg.dp))
                # gloo has no pre-scaled sum (NCCL's PREMUL_SUM): reduce-scatter a plain sum, scale apart
                if meshes.expert_fsdp.device_type == "cpu" and meshes.experts["efsdp"].size() > 1:
                    experts.set_force_sum_reduction_for_comms(True)
        fully_shard(unit if len(unit) > 1 else unit[0], mesh=meshes.fsdp, reshard_after_forward=reshard,
                    ignored_params=ignored, **common)
    for root in roots:
        # The root's weights (embedding, head) are needed again right away in backward: keep them.
        fully_shard(root, mesh=meshes.fsdp, reshard_after_forward=False, **common)


def experts_outside_fsdp(cfg: ParallelConfig) -> bool:
    """Whether each routed expert lives on one rank only, so FSDP leaves the experts alone."""
    return cfg.ep > 1 and cfg.ep == cfg.dp and not cfg.cpu_offload


def average_expert_gradients(blocks: list[nn.Module], cfg: ParallelConfig) -> None:
    """Divide the gradients of experts FSDP leaves alone by the data-parallel size, as FSDP's reduction
    does for the parameters it manages. Call once the parameters are materialised (`to_empty` replaces
    the parameter objects, and their hooks with them)."""
    if not experts_outside_fsdp(cfg):
        return
    for block in blocks:
        if isinstance(block.mlp, MoE):
            for param in block.mlp.experts.parameters():
                param.register_hook(lambda grad, dp=float(cfg.dp): grad / dp)
