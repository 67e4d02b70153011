"""Lay a Transformer out over the device meshes, torchtitan's order: cut the pipeline, then TP, EP,
activation checkpointing, compile, FSDP; then materialise and initialise only this rank's shards.

The model is built on the meta device, so no rank ever holds more than its own shards. Each parameter
gets DeepSeek-V3's initial value for its name (`dsv3.model.transformer.initial_value`), generated whole
and sliced to the rank's shard: every layout starts from exactly the weights a single process would.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from dsv3.config import RunConfig
from dsv3.model.fp8_linear import convert_to_fp8
from dsv3.model.moe import MoE
from dsv3.model.norm import RMSNorm
from dsv3.model.transformer import Block, Transformer, initial_value, set_activation_checkpointing
from dsv3.parallel.expert import apply_ep
from dsv3.parallel.fsdp import apply_fsdp, average_expert_gradients, experts_outside_fsdp, fsdp_units
from dsv3.parallel.mesh import Meshes
from dsv3.parallel.pipeline import LossParts, Stage, StageParts, build_schedule, pipeline_loss, split_stages
from dsv3.parallel.tensor import apply_tp

__all__ = ["ParallelModel", "parallelize", "apply_ac", "apply_compile", "init_parameters"]


@dataclass
class ParallelModel:
    """A Transformer laid out over the meshes: what the trainer steps, evaluates and checkpoints."""

    meshes: Meshes
    parts: nn.Module  # this rank's parameters under the whole model's names (the model itself without pp)
    moe_names: list[str]  # every MoE layer of the whole model, main blocks then MTP
    stages: list[tuple[int, Stage]] = field(default_factory=list)  # pp > 1: (stage index, Stage)
    schedule: Any = None
    loss_parts: LossParts | None = None

    @property
    def pipelined(self) -> bool:
        return bool(self.stages)

    def local_moe(self) -> list[tuple[int, MoE]]:
        """This rank's MoE layers with their index among `moe_names`."""
        index = {name: i for i, name in enumerate(self.moe_names)}
        return [(index[n], m) for n, m in self.parts.named_modules() if isinstance(m, MoE)]


def apply_ac(roots: list[nn.Module], mode: bool | str = True) -> None:
    """Recompute every block in backward, whole or selectively (the blocks' own switch; before compile,
    so a compiled block traces its checkpoint)."""
    for root in roots:
        set_activation_checkpointing(root, mode)


# Inductor's passes that move collectives away from their waits, in the order its config recommends.
# Measured on 2 H200s (docs/distributed.md): of the 2-chunk dispatch's NCCL time, 69 % ran behind
# compute with these against 50 % with the ATen-level overlap scheduler
# (`aten_distributed_optimizations.enable_overlap_scheduling`); 2 % of one chunk's, with neither.
OVERLAP_OPTIONS = {
    "reorder_for_compute_comm_overlap": True,
    "reorder_for_compute_comm_overlap_passes": [
        "reorder_communication_preserving_peak_memory", "sink_waits_iterative",
        "reorder_communication_preserving_peak_memory",
    ],
}


def apply_compile(blocks: list[nn.Module], fullgraph: bool, overlap_collectives: bool = False) -> None:
    """torch.compile each block in place (parameter names unchanged). `fullgraph=False` lets a block
    break where it must: at the all-to-all dispatch's host-read split sizes, at the hooks of an expert
    FSDP unit (experts held by several ranks), at tensor parallelism's gradient hook.
    `overlap_collectives`: Inductor may start a block's collectives (the chunked all-gather
    dispatch's) earlier and wait for them later, behind compute that does not need them (its
    reordering passes, CUDA only: they estimate kernel times on the GPU)."""
    options = OVERLAP_OPTIONS if overlap_collectives else None
    for block in blocks:
        block.compile(fullgraph=fullgraph, options=options)


@torch.no_grad()
def init_parameters(parts: nn.Module, norms: set[str], seed: int) -> None:
    """Every parameter (plain or a DTensor shard) takes the initial value of its name; buffers reset."""
    for name, p in parts.named_parameters():
        full = initial_value(name, p.shape, seed, name in norms)
        if isinstance(p, DTensor):
            shape, offset = compute_local_shape_and_global_offset(full.shape, p.device_mesh, p.placements)
            local = full[tuple(slice(o, o + n) for n, o in zip(shape, offset, strict=True))]
            p.to_local().copy_(local)
        else:
            p.copy_(full)
    for m in parts.modules():
        if isinstance(m, MoE):
            m.gate.e_score_correction_bias.zero_()
            m.tokens_per_expert.zero_()
    if isinstance(parts, Transformer):
        parts.init_buffers()


def parallelize(
    cfg: RunConfig, meshes: Meshes, device: torch.device, param_dtype: torch.dtype | None, n_micro: int
) -> ParallelModel:
    """This rank's part of `cfg.model`, laid out as `cfg.parallel` says and initialised from `train.seed`.
    `n_micro`: micro-batches per step on each data-parallel rank (the pipeline's schedule length)."""
    p, tc = cfg.parallel, cfg.train
    with torch.device("meta"):
        model = Transformer(cfg.model, seed=tc.seed)
    model.loss_chunk_tokens = tc.loss_chunk_tokens
    norms = {n for n, m in model.named_modules() if isinstance(m, RMSNorm)}
    norms = {f"{n}.weight" for n in norms}
    moe_names = [n for n, m in model.named_modules() if isinstance(m, MoE)]
    mtp, balance = tc.mtp_lambda > 0, tc.balance_alpha > 0
    stages: list[tuple[int, Stage]] = []
    if p.pp > 1:
        stages = split_stages(model, p, meshes.pp_rank, mtp, balance)
        parts: nn.Module = StageParts([s for _, s in stages])
        roots: list[nn.Module] = [s for _, s in stages]
    else:
        parts, roots = model, [model]
    blocks = [m for m in parts.modules() if isinstance(m, Block)]
    if p.tp > 1:
        apply_tp(blocks, meshes.tp)
    if p.ep > 1:
        moes = [m for m in parts.modules() if isinstance(m, MoE)]
        apply_ep(moes, meshes.ep, p.ep_dispatch, p.expert_chunks)
    if tc.fp8:
        convert_to_fp8(parts)
    if tc.activation_checkpointing:
        apply_ac(roots, tc.activation_checkpointing)
    if tc.compile:
        # the all-gather dispatch's fixed-size collectives trace: no break unless experts have an FSDP unit
        whole = p.ep == 1 or (experts_outside_fsdp(p) and p.ep_dispatch == "all_gather")
        chunked = whole and p.expert_chunks > 1 and device.type == "cuda"  # slices to overlap in one graph
        apply_compile(blocks, fullgraph=whole and p.tp == 1, overlap_collectives=chunked)
    if p.dp > 1:
        main_blocks = len(model.model.layers) if p.pp == 1 else len(blocks)  # no grouping in a pipeline
        apply_fsdp(roots, fsdp_units(blocks, main_blocks, p.fsdp_unit_blocks), meshes, p, param_dtype)
        if p.pp == 1:  # the trainer and generation call these, not forward: gather the root there too
            register_fsdp_forward_method(model, "forward_with_losses")
            register_fsdp_forward_method(model, "hidden_states")
    for root in roots:  # through the FSDP roots, so FSDP re-points its shards at the new storage
        root.to_empty(device="cpu" if p.cpu_offload else device)
    init_parameters(parts, norms, tc.seed)
    average_expert_gradients(blocks, p)
    if p.cpu_offload:  # FSDP moves parameters only: the buffers (routing biases, RoPE tables) compute here
        for module in parts.modules():
            for name, buffer in module.named_buffers(recurse=False):
                module._buffers[name] = buffer.to(device)
    result = ParallelModel(meshes, parts, moe_names, stages)
    if stages:
        result.loss_parts = LossParts(tc.mtp_lambda, tc.balance_alpha)
        result.schedule = build_schedule(
            stages, p, meshes.pp.get_group(), device, n_micro,
            lambda out, labels: pipeline_loss(out, labels, result.loss_parts, mtp, balance),
        )
    return result
