"""Memory: the KV cache per token (MLA vs multi-head) and training memory per GPU for a parallel layout."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from dsv3.config import ModelConfig, ParallelConfig, TrainConfig
from dsv3.scaling.layout import rank_stages, reshards_after_forward, stage_units
from dsv3.scaling.params import LayerParams, layer_params, mtp_block_params

__all__ = [
    "GiB",
    "HEADROOM",
    "KVCacheBytes",
    "MemoryEstimate",
    "MemoryProfile",
    "kv_cache_bytes_per_token",
    "memory_per_gpu",
    "memory_profile",
    "estimate_memory",
    "grad_bytes_for",
    "optimizer_bytes_for",
]

GiB = 1024**3
HEADROOM = 0.1  # of GPU memory kept free for the CUDA context, NCCL buffers and fragmentation
FP8_SCALE_BYTES = 4  # one fp32 scale per token per layer for an fp8 KV cache

# Bytes per parameter for AdamW under FSDP2 mixed precision (torchtitan's recipe): fp32 sharded master
# weights, fp32 sharded gradients, fp32 Adam m and v; compute runs on bf16 copies.
MASTER_BYTES, GRAD_BYTES, OPTIM_BYTES, COMPUTE_BYTES = 4, 4, 8, 2
ACT_BYTES = 2  # activations are bf16
LOGIT_BYTES = ACT_BYTES + 4  # bf16 logits plus the fp32 copy cross-entropy works on
# An eager (uncompiled) bf16-autocast step with fp32 master weights saves this much more than the
# activations counted here: the residual stream, norm inputs and temporaries stay float32 and every
# element-wise op keeps its own output. Measured by counting what autograd saves
# (`benchmarks/saved_activations.py --preset small`: 1.33x and 1.31x at T = 192 and 384, CPU).
EAGER_ACTIVATION_FACTOR = 1.32
# Under the all-to-all expert dispatch a rank keeps the routed rows its experts received, which
# follow the routing: the busiest rank of a layer took 1.24-1.37x the mean rank's rows (averaged over
# layers) in the first 40 steps of a fresh `small` router on 2 H200s, 1.08 by step 200 (the logged
# `ep_imbalance`, docs/distributed.md call 18), and the peak comes early. Budget the busiest rank.
EP_BUSIEST_RANK_ROUTED = 1.35


@dataclass(frozen=True)
class KVCacheBytes:
    """KV-cache bytes per token over all main layers: MLA's latent vs an equivalent multi-head cache.

    MLA caches the compressed latent and the shared RoPE key: kv_lora_rank + qk_rope_head_dim values
    per layer. The multi-head equivalent caches per head a key (qk_head_dim) and a value (v_head_dim).
    fp8 stores one byte per value plus one fp32 scale per token per layer.
    """

    layers: int
    mla_values_per_layer: int
    mha_values_per_layer: int

    @property
    def mla_bf16(self) -> int:
        return self.layers * self.mla_values_per_layer * 2

    @property
    def mla_fp8(self) -> int:
        return self.layers * (self.mla_values_per_layer + FP8_SCALE_BYTES)

    @property
    def mha_bf16(self) -> int:
        return self.layers * self.mha_values_per_layer * 2

    @property
    def mha_fp8(self) -> int:
        return self.layers * (self.mha_values_per_layer + FP8_SCALE_BYTES)

    def as_dict(self) -> dict[str, int]:
        props = ("mla_bf16", "mla_fp8", "mha_bf16", "mha_fp8")
        return {**asdict(self), **{p: getattr(self, p) for p in props}}


def kv_cache_bytes_per_token(cfg: ModelConfig) -> KVCacheBytes:
    """Cache cost of one token of context (the MTP module is not cached; it only drafts)."""
    return KVCacheBytes(
        layers=cfg.num_hidden_layers,
        mla_values_per_layer=cfg.kv_latent_dim,
        mha_values_per_layer=cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim),
    )


@dataclass(frozen=True)
class _Acts:
    """Activation bytes per token: the part tensor parallelism splits (heads, FFN widths), the rest, and
    of the rest the routed experts' rows (an all-gather expert dispatch keeps them for ep ranks' tokens)."""

    split: int
    replicated: int
    routed: int = 0

    def per_rank(self, tp: int, routed_copies: float = 1) -> float:
        return self.split / tp + self.replicated + self.routed * routed_copies


def _layer_activation_bytes(cfg: ModelConfig, moe: bool) -> _Acts:
    """Bytes per token that autograd keeps for one block's backward, without recomputation.

    Adapted from Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
    Models", sec. 4.1) to MLA + SwiGLU/MoE with a flash attention kernel (no s x s scores kept, no
    dropout): we list each tensor a backward needs. bf16 except the fp32 router scores and softmax stats.
    Tensor parallelism splits the per-head tensors and the dense/shared FFN widths; the norms, latents
    and routed experts stay whole on every tp rank (no sequence parallelism).
    """
    d, h = cfg.hidden_size, cfg.num_attention_heads
    q_path = 2 * cfg.q_lora_rank if cfg.q_lora_rank else 0  # q_a output and its norm's output
    attn_whole = 2 * d + q_path + cfg.kv_latent_dim + cfg.kv_lora_rank  # norm in/out, q_a, kv_a latents
    attn_heads = 2 * h * cfg.qk_head_dim + 2 * h * cfg.v_head_dim  # q, k, v; attention output
    norm = 2 * d  # post_attention_layernorm input and output
    if not moe:
        # SwiGLU keeps gate and up outputs, silu(gate), and the product fed to down_proj.
        return _Acts(ACT_BYTES * (attn_heads + 4 * cfg.intermediate_size) + 4 * h,
                     ACT_BYTES * (attn_whole + norm))
    # per copy: the input and SwiGLU's; no output is kept (the combine weights are applied inside
    # SwiGLU, whose backward makes their gradient: dsv3.model.swiglu)
    routed = cfg.num_experts_per_tok * (d + 4 * cfg.moe_intermediate_size)
    shared = 4 * cfg.n_shared_experts * cfg.moe_intermediate_size
    return _Acts(ACT_BYTES * (attn_heads + shared) + 4 * h,
                 ACT_BYTES * (attn_whole + norm) + 4 * cfg.n_routed_experts, ACT_BYTES * routed)


def _layer_selective_bytes(cfg: ModelConfig, moe: bool) -> _Acts:
    """Bytes per token a block keeps under selective recomputation (`train.activation_checkpointing:
    selective`): its input, every GEMM's output and the attention output with its softmax statistics;
    what lies between them (norms, RoPE, SwiGLU's product, routing, gathers) is remade in the backward."""
    d, h = cfg.hidden_size, cfg.num_attention_heads
    # per head (split by tp): q_b and kv_b outputs, the attention output
    heads = h * cfg.qk_head_dim + h * (cfg.qk_nope_head_dim + cfg.v_head_dim) + h * cfg.v_head_dim
    whole = d + (cfg.q_lora_rank or 0) + cfg.kv_latent_dim + d  # input, q_a / kv_a / o_proj outputs
    if not moe:  # gate and up outputs (split), down_proj output
        return _Acts(ACT_BYTES * (heads + 2 * cfg.intermediate_size) + 4 * h, ACT_BYTES * (whole + d))
    shared = 2 * cfg.n_shared_experts * cfg.moe_intermediate_size  # shared gate/up outputs (split)
    routed = cfg.num_experts_per_tok * (2 * cfg.moe_intermediate_size + d)  # grouped GEMM outputs per copy
    return _Acts(ACT_BYTES * (heads + shared) + 4 * h,  # + float32 softmax statistics
                 ACT_BYTES * (whole + d) + 4 * cfg.n_routed_experts,  # shared down; router logits
                 ACT_BYTES * routed)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU on the heaviest pipeline rank for one layout (see `memory_per_gpu`)."""

    weights: int
    gradients: int
    optimizer: int
    activations: int  # without recomputation
    activations_recompute: int  # full recomputation of every block
    recompute: bool | Literal["selective"]  # which the layout uses (train.activation_checkpointing)
    stage: int  # the pipeline rank reported
    micro_batches_in_flight: float
    activations_selective: int = 0  # selective recomputation: blocks keep GEMM and attention outputs
    # Gradients live through the forward only when they accumulate over micro-batches (or stages);
    # otherwise the step frees them (set to None) and the backward makes them as it frees activations.
    gradients_in_forward: bool = True

    @property
    def active_activations(self) -> int:
        """The activations of the layout's recomputation choice."""
        if self.recompute == "selective":
            return self.activations_selective
        return self.activations_recompute if self.recompute else self.activations

    @property
    def total(self) -> int:
        act = self.active_activations
        # Without accumulation the backward's peak is the larger of the activations (its start) and
        # the gradients (its end): layer by layer, one is freed as the other is made.
        held = self.gradients + act if self.gradients_in_forward else max(self.gradients, act)
        return self.weights + self.optimizer + held

    def fits(self, gpu_memory_gb: float, headroom: float = HEADROOM) -> bool:
        """Within the GPU's memory, keeping `headroom` for the CUDA context, NCCL and fragmentation."""
        return self.total <= gpu_memory_gb * GiB * (1 - headroom)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}


@dataclass(frozen=True)
class _Unit:
    """Parameters FSDP gathers together: one block, the embedding, the head, or one MTP depth."""

    matrices: int  # split by tp
    replicated: int  # norms and router, not split by tp
    experts: int = 0  # routed experts, split by ep (then FSDP), whole on every tp rank

    def local(self, tp: int) -> float:
        return self.matrices / tp + self.replicated + self.experts

    def gathered(self, tp: int, ep: int) -> float:
        return self.matrices / tp + self.replicated + self.experts / ep


def _block_unit(lp: LayerParams, extra_matrices: int = 0, extra_norms: int = 0) -> _Unit:
    matrices = lp.attention + lp.dense_ffn + lp.shared_experts + extra_matrices
    return _Unit(matrices, lp.norms + lp.router + extra_norms, lp.routed_experts)


@dataclass(frozen=True)
class MemoryProfile:
    """Per-unit sizes of one config, computed once so that a layout search is plain arithmetic.

    Units are the pipeline's: the decoder blocks, then the MTP depths (`dsv3.scaling.layout`)."""

    units: list[_Unit]
    n_blocks: int  # units[:n_blocks] are the decoder blocks, the rest the MTP depths
    acts: list[_Acts]  # per unit, without recomputation (an MTP depth includes its head's logits)
    acts_recompute: list[_Acts]  # per unit, what recomputation keeps (a block's input; MTP: its head too)
    rebuilt: list[_Acts]  # per unit, the block activations recomputation rebuilds at once
    acts_selective: list[_Acts]  # per unit, what selective recomputation keeps
    embedding: _Unit  # on the first stage
    head: _Unit  # final norm + output head, on the last stage
    head_act: _Acts
    logits: int  # bytes per token of one head's logits (bf16 and the float32 copy), in head_act and MTP


def memory_profile(cfg: ModelConfig) -> MemoryProfile:
    """The sizes `estimate_memory` needs, per pipeline unit."""
    d, V = cfg.hidden_size, cfg.vocab_size
    moe = [cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)]
    head_act = _Acts(0, ACT_BYTES * 2 * d + LOGIT_BYTES * V)  # final norm in/out, logits
    mtp_block = _layer_activation_bytes(cfg, cfg.is_moe_layer(cfg.num_hidden_layers))
    mtp_selective = _layer_selective_bytes(cfg, cfg.is_moe_layer(cfg.num_hidden_layers))
    # enorm/hnorm inputs and outputs and the concatenation fed to eh_proj, then the block and the head.
    mtp_around = ACT_BYTES * 6 * d + head_act.replicated
    n_mtp = cfg.num_nextn_predict_layers
    blocks = [_layer_activation_bytes(cfg, m) for m in moe]
    return MemoryProfile(
        units=[_block_unit(layer_params(cfg, m)) for m in moe]
        + [_block_unit(mtp_block_params(cfg), extra_matrices=2 * d * d, extra_norms=3 * d)] * n_mtp,
        n_blocks=len(moe),
        acts=blocks
        + [_Acts(mtp_block.split, mtp_block.replicated + mtp_around, mtp_block.routed)] * n_mtp,
        acts_recompute=[_Acts(0, ACT_BYTES * d)] * len(moe)
        + [_Acts(0, ACT_BYTES * 2 * d + mtp_around)] * n_mtp,
        rebuilt=blocks + [mtp_block] * n_mtp,
        acts_selective=[_layer_selective_bytes(cfg, m) for m in moe]
        + [_Acts(mtp_selective.split, mtp_selective.replicated + ACT_BYTES * d + mtp_around,
                 mtp_selective.routed)] * n_mtp,
        embedding=_Unit(V * d, 0),
        head=_Unit(0 if cfg.tie_word_embeddings else V * d, d),
        head_act=head_act,
        logits=LOGIT_BYTES * V,
    )


def _in_flight(parallel: ParallelConfig, rank: int, n_micro: int) -> float:
    """Micro-batches whose activations (of all the rank's stages together) a pp rank holds at its peak."""
    pp, schedule = parallel.pp, parallel.pp_schedule
    if pp == 1:
        return 1.0
    if schedule == "DualPipeV":  # DualPipe's README: PP+1 chunk activations, a chunk half a rank's layers
        return min(pp + 0.5, float(n_micro))
    if schedule == "ZBVZeroBubble":  # ZB-V keeps 1F1B's peak: pp micro-batches of a rank's layers
        return float(min(pp, n_micro))
    held = float(min(pp - rank, n_micro))  # 1F1B: rank r warms up with pp - r forwards
    if schedule == "interleaved1F1B":  # Korthikanti et al. 2022, with 2 virtual stages per rank
        held *= 1 + (pp - 1) / (2 * pp)
    return held


def estimate_memory(
    prof: MemoryProfile, layout: ParallelConfig, *, seq_len: int, micro_batch: int, n_micro: int,
    recompute: bool | Literal["selective"], loss_chunk_tokens: int = 0, eager: bool = False,
    optimizer_bytes: int = OPTIM_BYTES, grad_bytes: int = GRAD_BYTES,
) -> MemoryEstimate:
    """Peak bytes per GPU for one layout from a precomputed profile: the fast path of layout searches.

    `loss_chunk_tokens` > 0 (`train.loss_chunk_tokens`): no head keeps its logits; one chunk's logits
    and their gradient exist at a time instead, and each head's weight gradient from its forward on.
    `eager` (no `train.compile`): activations times EAGER_ACTIVATION_FACTOR. `optimizer_bytes`: AdamW's
    moments a parameter (`optimizer_bytes_for`); `grad_bytes`: a gradient's, one replica (2 for bf16
    weights with float32 masters, `train.param_dtype`: the weights then take bf16 + master, the
    same 6 bytes as a float32 weight and its autocast copy)."""
    dp_shard, tp, ep = layout.dp_shard, layout.tp, layout.ep
    # routed rows kept per token of this rank: the group's under the all-gather dispatch (fixed
    # buffers), else its experts' share, the busiest rank's under expert parallelism
    copies = ep if layout.ep_dispatch == "all_gather" else EP_BUSIEST_RANK_ROUTED if ep > 1 else 1
    tokens = micro_batch * seq_len
    weighted_tokens = tokens * (EAGER_ACTIVATION_FACTOR if eager else 1.0)  # what activations scale with
    n_stages = layout.pp * layout.stages_per_rank
    bounds = stage_units(len(prof.units), n_stages)
    # the largest FSDP unit: `fsdp_unit_blocks` consecutive decoder blocks, an MTP depth, or the root
    k = layout.fsdp_unit_blocks
    sizes = [u.gathered(tp, ep) for u in prof.units[: prof.n_blocks]]
    gathered = max([sum(sizes[i : i + k]) for i in range(0, len(sizes), k)]
                   + [u.gathered(tp, ep) for u in [*prof.units[prof.n_blocks :], prof.embedding, prof.head]])
    best: MemoryEstimate | None = None
    for rank in range(layout.pp):
        stages = rank_stages(rank, layout)
        units = [u for s in stages for u in bounds[s]]
        first, last = 0 in stages, n_stages - 1 in stages
        params = sum(prof.units[u].local(tp) for u in units)
        params += (prof.embedding.local(tp) if first else 0) + (prof.head.local(tp) if last else 0)
        local = params / dp_shard
        if dp_shard > 1:
            # FSDP2 holds bf16 gathered copies of the current and the prefetched unit, or of every unit
            # of the rank when they are kept from forward to backward; in a pipeline (or with
            # `grad_sync: last_micro_batch`) gradients accumulate unsharded, in fp32, over the step's
            # micro-batches until the last one reduces them.
            rank_gathered = sum(prof.units[u].gathered(tp, ep) for u in units)
            rank_gathered += (prof.embedding.gathered(tp, ep) if first else 0)
            rank_gathered += (prof.head.gathered(tp, ep) if last else 0)
            kept = 2 * gathered if reshards_after_forward(layout) else rank_gathered
            deferred = layout.pp > 1 or (layout.grad_sync == "last_micro_batch" and n_micro > 1)
            unsharded_grads = rank_gathered if deferred else gathered
            on_gpu = 0 if layout.cpu_offload else local  # offload: shards and AdamW state in host memory
            weights = MASTER_BYTES * on_gpu + COMPUTE_BYTES * kept
            grads = GRAD_BYTES * (on_gpu + unsharded_grads)
        else:  # one replica: autocast keeps a bf16 copy of every weight used in the forward
            weights, grads = (MASTER_BYTES + COMPUTE_BYTES) * local, grad_bytes * local
        held = _in_flight(layout, rank, n_micro)
        # The warm-up forwards pile up in the blocks; the last stage's outputs (head, MTP) go into
        # backward as soon as their loss is computed, one micro-batch at a time.
        blocks, outputs = [u for u in units if u < prof.n_blocks], [u for u in units if u >= prof.n_blocks]
        head = prof.head_act.per_rank(tp, copies) if last else 0.0
        # Chunked losses: the heads' logits are not kept (bytes a token), one chunk's exist at a time,
        # and each head's loss holds its weight's float32 gradient from its forward to the backward.
        heads = ((1 if last else 0) + len(outputs)) if loss_chunk_tokens else 0
        unkept = prof.logits * heads
        chunk_rows = min(loss_chunk_tokens, tokens) if last else 0
        # one chunk's logits and their gradient, and the heads' weight gradients (bytes)
        chunk = 2 * prof.logits * chunk_rows + GRAD_BYTES * prof.head.local(tp) * heads
        full = held * sum(prof.acts[u].per_rank(tp, copies) for u in blocks)
        full += sum(prof.acts[u].per_rank(tp, copies) for u in outputs) + head - unkept
        # Recomputation keeps each block's input and rebuilds one block at a time during backward.
        rebuilt = max((prof.rebuilt[u].per_rank(tp, copies) for u in units), default=0.0)
        kept = held * sum(prof.acts_recompute[u].per_rank(tp, copies) for u in blocks) + rebuilt
        kept += sum(prof.acts_recompute[u].per_rank(tp, copies) for u in outputs) + head - unkept
        # Selective recomputation keeps GEMM and attention outputs, rebuilding the rest one block at a time.
        selective = held * sum(prof.acts_selective[u].per_rank(tp, copies) for u in blocks) + rebuilt
        selective += sum(prof.acts_selective[u].per_rank(tp, copies) for u in outputs) + head - unkept
        est = MemoryEstimate(
            weights=int(weights),
            gradients=int(grads),
            optimizer=0 if layout.cpu_offload else int(optimizer_bytes * local),
            activations=int(full * weighted_tokens + chunk),
            activations_recompute=int(kept * weighted_tokens + chunk),
            recompute=recompute,
            stage=rank,
            micro_batches_in_flight=held,
            activations_selective=int(selective * weighted_tokens + chunk),
            gradients_in_forward=n_micro > 1 or layout.pp > 1,
        )
        if best is None or est.total > best.total:
            best = est
    assert best is not None
    return best


def memory_per_gpu(cfg: ModelConfig, train: TrainConfig, parallel: ParallelConfig) -> MemoryEstimate:
    """Peak bytes per GPU for `parallel` at `train`'s micro-batch and sequence length.

    AdamW under FSDP2 mixed precision: fp32 master weights, fp32 gradients and fp32 m, v, all sharded
    over dp_shard (16 bytes per parameter; 12 with bf16 moments), plus bf16 compute copies. Routed
    experts are split over ep (then FSDP over the rest of dp_shard), attention and dense FFN matrices
    over tp, blocks over the pipeline stages as the trainer cuts them (`dsv3.scaling.layout`; the
    heaviest pp rank is reported).
    Activations follow `train.activation_checkpointing` (none, whole blocks, or selective: GEMM and
    attention outputs kept), `train.loss_chunk_tokens` (the heads' logits one chunk at a time) and
    `train.compile` (an eager step keeps more: EAGER_ACTIVATION_FACTOR).
    """
    n_micro = max(1, train.global_batch_size // (train.micro_batch_size * parallel.dp))
    return estimate_memory(
        memory_profile(cfg), parallel, seq_len=train.seq_len, micro_batch=train.micro_batch_size,
        n_micro=n_micro,
        recompute=train.activation_checkpointing, loss_chunk_tokens=train.loss_chunk_tokens,
        eager=not train.compile, optimizer_bytes=optimizer_bytes_for(train, parallel.gpus),
        grad_bytes=grad_bytes_for(train, parallel.gpus),
    )


def grad_bytes_for(train: TrainConfig, gpus: int) -> int:
    """A gradient's bytes on `gpus` GPUs: bf16 (2) with bf16 weights (`param_dtype`), else float32 (4)."""
    return COMPUTE_BYTES if train.bf16_weights("cuda", gpus) else GRAD_BYTES


def optimizer_bytes_for(train: TrainConfig, gpus: int) -> int:
    """AdamW's m and v a parameter on `gpus` GPUs: float32 (8 bytes) or bfloat16 (4,
    `optimizer_state_dtype`)."""
    return OPTIM_BYTES // 2 if train.bf16_moments("cuda", gpus) else OPTIM_BYTES
