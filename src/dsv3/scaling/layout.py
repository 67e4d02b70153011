"""Which layouts `dsv3 train` runs, and where the pipeline cuts the model: one home for both rules.

The trainer (`dsv3.parallel`), the memory estimate and `select-config` all read these, so a layout the
planner proposes is one the trainer accepts, and the planner's stages are the trainer's stages.

Pipeline units are the decoder blocks followed by the MTP depths (each MTP depth is one block): the
units are split as evenly as possible over `pp × stages_per_rank` stages, the first stages taking the
remainder; the embedding rides with stage 0, the final norm, head and MTP with the last stage. Stage s
sits on pp rank s (1F1B), s mod pp (interleaved1F1B, "loop"), or s and 2·pp−1−s share a rank (the V
schedules, so rank 0 holds both the embedding and the head, as DualPipe places them).
"""

from __future__ import annotations

from dsv3.config import ModelConfig, ParallelConfig, TrainConfig

__all__ = ["stage_units", "rank_stages", "reshards_after_forward", "expert_nodes", "layout_problems"]

V_SCHEDULES = ("ZBVZeroBubble", "DualPipeV")


def stage_units(n_units: int, n_stages: int) -> list[range]:
    """Contiguous, as-even-as-possible ranges of pipeline units per stage; the first stages take the rest."""
    base, extra = divmod(n_units, n_stages)
    bounds, start = [], 0
    for s in range(n_stages):
        size = base + (1 if s < extra else 0)
        bounds.append(range(start, start + size))
        start += size
    return bounds


def rank_stages(rank: int, parallel: ParallelConfig) -> list[int]:
    """The stage indices pp rank `rank` holds, in execution order of its first use."""
    pp = parallel.pp
    if parallel.stages_per_rank == 1:
        return [rank]
    if parallel.pp_schedule in V_SCHEDULES:
        return [rank, 2 * pp - 1 - rank]
    return [rank, rank + pp]  # interleaved1F1B: looped placement


def expert_nodes(n_experts: int, parallel: ParallelConfig, ranks_per_node: int, first_rank: int) -> list[int]:
    """The node of each routed expert for the expert-parallel group starting at global rank `first_rank`:
    experts go to the ep ranks in order, E/ep each; torchrun numbers ranks node by node."""
    per_rank = n_experts // parallel.ep
    return [(first_rank + e // per_rank) // ranks_per_node for e in range(n_experts)]


def _node_limit_problem(model: ModelConfig, parallel: ParallelConfig, ranks_per_node: int) -> str | None:
    """Why routing could send a token to more than `max_nodes_per_token` nodes (None when it cannot).

    DeepSeek-V3 limits nodes through its expert groups: a token picks experts from `topk_group`
    groups, so when every group lies on one node it reaches at most topk_group nodes.
    """
    limit = parallel.max_nodes_per_token
    if limit is None or parallel.ep == 1:
        return None
    per_group = model.n_routed_experts // model.n_group
    for first in range(0, parallel.gpus, parallel.ep):  # ep groups: runs of ep neighbouring ranks (tp = 1)
        nodes = expert_nodes(model.n_routed_experts, parallel, ranks_per_node, first)
        if len(set(nodes)) <= limit:
            continue
        split = [g for g in range(model.n_group) if len(set(nodes[g * per_group : (g + 1) * per_group])) > 1]
        where = f"parallel.max_nodes_per_token={limit}"
        if split:
            return (f"{where}: the {parallel.ep} expert-parallel ranks span {len(set(nodes))} nodes of "
                    f"{ranks_per_node} GPUs and expert group {split[0]} straddles two: make model.n_group "
                    "a multiple of the nodes so each group lies on one node")
        if model.topk_group > limit:
            return (f"{where}: model.topk_group={model.topk_group} lets a token reach {model.topk_group} of "
                    f"the {len(set(nodes))} nodes: set topk_group <= {limit}")
    return None


def reshards_after_forward(parallel: ParallelConfig) -> bool:
    """FSDP's choice: the config's; by default yes, except in a pipeline: its schedules run several
    micro-batches' forwards before their backwards (the V schedules also split each backward in two), so
    a stage keeps its gathered weights until the step's end, when the schedule reduces and reshards."""
    if parallel.reshard_after_forward is None:
        return parallel.pp == 1
    return parallel.reshard_after_forward


def _min_micro_batches(parallel: ParallelConfig, n_micro: int) -> str | None:
    """Why `n_micro` micro-batches per step are too few for the schedule (None when they suffice)."""
    stages = parallel.pp * parallel.stages_per_rank
    schedule = parallel.pp_schedule
    if schedule == "1F1B" and n_micro < parallel.pp:
        return f"1F1B needs at least pp = {parallel.pp}"
    if schedule in V_SCHEDULES and n_micro < stages:
        return f"{schedule} needs at least its {stages} stages (2·pp)"
    if schedule == "interleaved1F1B":
        rounds = max(1, n_micro // parallel.pp)
        if n_micro % rounds:
            return f"interleaved1F1B needs a multiple of pp = {parallel.pp} (or fewer than pp)"
    return None


def layout_problems(
    model: ModelConfig, train: TrainConfig, parallel: ParallelConfig, ranks_per_node: int | None = None
) -> list[str]:
    """Everything that keeps `dsv3 train` from running this layout, one phrase each (empty: it runs).
    `ranks_per_node` (GPUs per node) lets node-limited routing be checked."""
    p, problems = parallel, []
    if model.n_routed_experts % p.ep:
        problems.append(f"parallel.ep={p.ep} must divide model.n_routed_experts={model.n_routed_experts}")
    per_step = p.dp * train.micro_batch_size
    if train.global_batch_size % per_step:
        problems.append(
            f"train.global_batch_size={train.global_batch_size} must be a multiple of "
            f"train.micro_batch_size={train.micro_batch_size} × {p.dp} data-parallel ranks "
            "(dp_replicate*dp_shard)"
        )
    if p.tp > 1:
        if p.ep > 1 or p.pp > 1:
            problems.append(
                f"parallel.tp={p.tp} combines with FSDP (dp_shard, dp_replicate) only: set ep=1 and pp=1 "
                "(tensor parallel with expert or pipeline parallel is not implemented)"
            )
        widths = {
            "model.num_attention_heads": model.num_attention_heads,
            "model.intermediate_size": model.intermediate_size,
            "model.moe_intermediate_size*n_shared_experts": model.moe_intermediate_size
            * model.n_shared_experts,
        }
        for key, width in widths.items():
            if width % p.tp:
                problems.append(f"parallel.tp={p.tp} must divide {key}={width}")
    if train.fp8 and p.tp > 1:
        problems.append(f"train.fp8 with parallel.tp={p.tp}: FP8 linears quantize whole weights and inputs, "
                        "not tensor-parallel shards (use tp=1)")
    if train.compile == "model" and p.gpus > 1:
        problems.append("train.compile=model compiles one process's whole forward: with parallel.gpus="
                        f"{p.gpus} use train.compile=true (each block compiled, hooks and exchanges between)")
    if train.param_dtype == "bfloat16" and p.gpus > 1:
        problems.append(f"train.param_dtype=bfloat16 keeps master weights for one process: with "
                        f"parallel.gpus={p.gpus} leave it float32 (FSDP computes in bf16 from float32 "
                        "shards already)")
    if p.fsdp_unit_blocks > 1 and p.pp > 1:
        problems.append(f"parallel.fsdp_unit_blocks={p.fsdp_unit_blocks} with pp={p.pp}: a pipeline shards "
                        "each block alone (set fsdp_unit_blocks=1)")
    if p.pp > 1:
        stages = p.pp * p.stages_per_rank
        units = model.num_hidden_layers + model.num_nextn_predict_layers
        if stages > units:
            problems.append(
                f"parallel.pp={p.pp} with {p.pp_schedule} cuts {stages} stages from {units} blocks "
                "(num_hidden_layers + num_nextn_predict_layers): each stage needs a block"
            )
        elif stage_units(units, stages)[-1].start > model.num_hidden_layers:
            problems.append(
                f"parallel.pp={p.pp} with {p.pp_schedule}: the {model.num_nextn_predict_layers} MTP depths "
                "would span stages; they must all sit on the last stage (use fewer stages)"
            )
        if p.reshard_after_forward and p.pp_schedule in V_SCHEDULES:
            problems.append(
                f"parallel.reshard_after_forward=true with {p.pp_schedule}: its split backward computes "
                "weight gradients after later forwards, on weights FSDP would have freed; leave it unset"
            )
        if model.tie_word_embeddings:
            problems.append("parallel.pp > 1 with model.tie_word_embeddings: the embedding and the head sit "
                            "on different stages; untie them")
        if not train.global_batch_size % per_step:
            n_micro = train.global_batch_size // per_step
            why = _min_micro_batches(p, n_micro)
            if why:
                problems.append(
                    f"parallel.pp_schedule={p.pp_schedule}: {n_micro} micro-batches per step per "
                    f"data-parallel rank (global_batch_size / (micro_batch_size × dp)) but {why}"
                )
    if ranks_per_node is not None and (why := _node_limit_problem(model, p, ranks_per_node)):
        problems.append(why)
    if p.cpu_offload and p.dp == 1:
        problems.append("parallel.cpu_offload needs FSDP: dp_shard or dp_replicate > 1")
    return problems
