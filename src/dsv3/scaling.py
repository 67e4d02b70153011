"""Parameter, FLOP, KV-cache and memory accounting for DeepSeek-V3-style models; Chinchilla; config choice.

Pure functions over the config objects, so the trainer (MFU), the benchmarks and `dsv3 plan` share one
home for every formula. The conventions are stated once, in `docs/scaling.md` and on each function.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from dsv3.config import ModelConfig, ParallelConfig, RunConfig, TrainConfig

__all__ = [
    "LayerParams",
    "ParamCounts",
    "FlopBreakdown",
    "KVCacheBytes",
    "MemoryEstimate",
    "ChinchillaCheck",
    "Plan",
    "Choice",
    "GiB",
    "H100_BF16_TFLOPS",
    "layer_params",
    "count_params",
    "training_flops_per_token",
    "kv_cache_bytes_per_token",
    "memory_per_gpu",
    "chinchilla_check",
    "lr_and_batch_for_compute",
    "plan_run",
    "training_hours",
    "select_configs",
    "plan_sections",
    "markdown_report",
    "human_count",
    "human_bytes",
    "describe_layout",
]

GiB = 1024**3
H100_BF16_TFLOPS = 989.0  # H100 SXM dense bf16 peak, the usual MFU denominator

# Bytes per parameter for AdamW under FSDP2 mixed precision (torchtitan's recipe): fp32 sharded master
# weights, fp32 sharded gradients, fp32 Adam m and v; compute runs on bf16 copies.
MASTER_BYTES, GRAD_BYTES, OPTIM_BYTES, COMPUTE_BYTES = 4, 4, 8, 2
ACT_BYTES = 2  # activations are bf16
LOGIT_BYTES = ACT_BYTES + 4  # bf16 logits plus the fp32 copy cross-entropy works on
FP8_SCALE_BYTES = 4  # one fp32 scale per token per layer for an fp8 KV cache
HEADROOM = 0.1  # of GPU memory kept free for the CUDA context, NCCL buffers and fragmentation
RECOMPUTE_SLOWDOWN = 4 / 3  # full recomputation repeats the forward: 4 passes of work instead of 3


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerParams:
    """Parameters of one decoder block, by component (Hugging Face DeepSeek-V3 shapes, no biases)."""

    attention: int  # q_a/q_b (or q_proj), kv_a_proj_with_mqa, kv_b_proj, o_proj
    norms: int  # input/post_attention layernorms, q_a_layernorm, kv_a_layernorm
    dense_ffn: int = 0
    router: int = 0  # gate.weight; e_score_correction_bias is a buffer, not counted
    shared_experts: int = 0
    routed_experts: int = 0
    routed_experts_active: int = 0  # the num_experts_per_tok experts a token goes through

    @property
    def total(self) -> int:
        ffn = self.dense_ffn + self.router + self.shared_experts + self.routed_experts
        return self.attention + self.norms + ffn

    @property
    def active(self) -> int:
        return self.total - self.routed_experts + self.routed_experts_active


def layer_params(cfg: ModelConfig, moe: bool) -> LayerParams:
    """One decoder block; `moe` picks the MoE feed-forward over the dense one (see `cfg.is_moe_layer`)."""
    d, h = cfg.hidden_size, cfg.num_attention_heads
    if cfg.q_lora_rank is None:
        q = d * h * cfg.qk_head_dim
    else:
        q = d * cfg.q_lora_rank + cfg.q_lora_rank * h * cfg.qk_head_dim
    kv_a = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    kv = kv_a + cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    attention = q + kv + h * cfg.v_head_dim * d
    norms = 2 * d + cfg.kv_lora_rank + (cfg.q_lora_rank or 0)
    if not moe:
        return LayerParams(attention, norms, dense_ffn=3 * d * cfg.intermediate_size)
    expert = 3 * d * cfg.moe_intermediate_size  # gate, up, down
    return LayerParams(
        attention,
        norms,
        router=cfg.n_routed_experts * d,
        shared_experts=cfg.n_shared_experts * expert,
        routed_experts=cfg.n_routed_experts * expert,
        routed_experts_active=cfg.num_experts_per_tok * expert,
    )


def _mtp_extra_params(cfg: ModelConfig) -> int:
    """Per MTP depth, besides its block: enorm, hnorm, eh_proj (2d→d) and shared_head.norm."""
    d = cfg.hidden_size
    return 3 * d + 2 * d * d


@dataclass(frozen=True)
class ParamCounts:
    """Exact parameter counts of the main model by component, with the MTP module listed apart.

    `total` equals `sum(p.numel() for p in model.parameters())` without MTP. `active` counts every
    parameter a token multiplies through: all but the input-embedding table (a lookup) and the
    routed experts a token is not sent to. MTP shares the embedding and output head, so its counts
    hold only its own modules.
    """

    embedding: int
    output_head: int  # 0 when tied: the head is the embedding table
    attention: int
    dense_ffn: int
    routed_experts: int
    routed_experts_active: int
    shared_experts: int
    router: int
    norms: int  # every RMSNorm weight, the final norm included
    mtp: int  # all num_nextn_predict_layers modules
    mtp_active: int
    head_matmul: int  # vocab x hidden: the output projection's work, tied or not

    @property
    def total(self) -> int:
        return (
            self.embedding + self.output_head + self.attention + self.dense_ffn + self.routed_experts
            + self.shared_experts + self.router + self.norms
        )

    @property
    def active(self) -> int:
        lookups_and_idle = self.embedding + self.output_head + self.routed_experts
        return self.total - lookups_and_idle + self.head_matmul + self.routed_experts_active

    @property
    def total_with_mtp(self) -> int:
        return self.total + self.mtp

    def as_dict(self) -> dict[str, int]:
        derived = {"total": self.total, "active": self.active, "total_with_mtp": self.total_with_mtp}
        return {**asdict(self), **derived}


def _mtp_layer(cfg: ModelConfig) -> LayerParams:
    # The MTP block follows the main stack, so it is MoE iff a layer at index num_hidden_layers would be.
    return layer_params(cfg, cfg.is_moe_layer(cfg.num_hidden_layers))


def count_params(cfg: ModelConfig) -> ParamCounts:
    """Exact counts for `cfg` (see `ParamCounts` for what each field holds)."""
    layers = [layer_params(cfg, cfg.is_moe_layer(i)) for i in range(cfg.num_hidden_layers)]
    table = cfg.vocab_size * cfg.hidden_size
    mtp_block = _mtp_layer(cfg)
    n_mtp = cfg.num_nextn_predict_layers
    return ParamCounts(
        embedding=table,
        output_head=0 if cfg.tie_word_embeddings else table,
        attention=sum(lp.attention for lp in layers),
        dense_ffn=sum(lp.dense_ffn for lp in layers),
        routed_experts=sum(lp.routed_experts for lp in layers),
        routed_experts_active=sum(lp.routed_experts_active for lp in layers),
        shared_experts=sum(lp.shared_experts for lp in layers),
        router=sum(lp.router for lp in layers),
        norms=sum(lp.norms for lp in layers) + cfg.hidden_size,
        mtp=n_mtp * (mtp_block.total + _mtp_extra_params(cfg)),
        mtp_active=n_mtp * (mtp_block.active + _mtp_extra_params(cfg)),
        head_matmul=table,
    )


# --------------------------------------------------------------------------------------------
# FLOPs and KV cache
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlopBreakdown:
    """Training FLOPs per token (forward + backward, no recomputation), the MFU numerator.

    matmul = 6·N_active; attention = 6·L·s_eff·H·(qk_head_dim + v_head_dim) with s_eff = s/2 under
    causal masking (the mean number of keys a query sees), s otherwise; mtp = per MTP depth,
    6·(its active params + the shared head's vocab·hidden) plus its own attention term.
    """

    seq_len: int
    causal: bool
    matmul: int
    attention: int
    mtp: int

    @property
    def without_mtp(self) -> int:
        return self.matmul + self.attention

    @property
    def total(self) -> int:
        return self.matmul + self.attention + self.mtp

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "without_mtp": self.without_mtp, "total": self.total}


def _attention_flops(cfg: ModelConfig, layers: int, seq_len: int, causal: bool) -> int:
    # QK^T and AV: 2·s·H·(d_qk + d_v) forward per token per layer, x3 for training, halved when causal.
    per_layer = 6 * seq_len * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    return layers * per_layer // (2 if causal else 1)


def training_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> FlopBreakdown:
    """FLOPs to train on one token at sequence length `seq_len` (see `FlopBreakdown` for the formula)."""
    counts = count_params(cfg)
    n_mtp = cfg.num_nextn_predict_layers
    return FlopBreakdown(
        seq_len=seq_len,
        causal=causal,
        matmul=6 * counts.active,
        attention=_attention_flops(cfg, cfg.num_hidden_layers, seq_len, causal),
        mtp=6 * (counts.mtp_active + n_mtp * counts.head_matmul)
        + _attention_flops(cfg, n_mtp, seq_len, causal),
    )


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
        mla_values_per_layer=cfg.kv_lora_rank + cfg.qk_rope_head_dim,
        mha_values_per_layer=cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim),
    )


# --------------------------------------------------------------------------------------------
# Memory per GPU
# --------------------------------------------------------------------------------------------


def _layer_activation_bytes(cfg: ModelConfig, moe: bool) -> int:
    """Bytes per token that autograd keeps for one block's backward, without recomputation.

    Adapted from Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
    Models", sec. 4.1) to MLA + SwiGLU/MoE with a flash attention kernel (no s x s scores kept, no
    dropout): we list each tensor a backward needs. bf16 except the fp32 router scores and softmax stats.
    """
    d, h = cfg.hidden_size, cfg.num_attention_heads
    q_path = 2 * cfg.q_lora_rank if cfg.q_lora_rank else 0  # q_a output and its norm's output
    attn = (
        2 * d  # input_layernorm input and output
        + q_path
        + (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank  # kv_a output, kv_a_layernorm output
        + 2 * h * cfg.qk_head_dim + h * cfg.v_head_dim  # q, k, v kept by the attention kernel
        + h * cfg.v_head_dim  # attention output, o_proj input
    )
    norm = 2 * d  # post_attention_layernorm input and output
    if not moe:
        # SwiGLU keeps gate and up outputs, silu(gate), and the product fed to down_proj.
        return ACT_BYTES * (attn + norm + 4 * cfg.intermediate_size) + 4 * h
    routed = cfg.num_experts_per_tok * (2 * d + 4 * cfg.moe_intermediate_size)  # per copy: in, SwiGLU, out
    shared = 4 * cfg.n_shared_experts * cfg.moe_intermediate_size
    return ACT_BYTES * (attn + norm + routed + shared) + 4 * h + 4 * cfg.n_routed_experts


def _output_activation_bytes(cfg: ModelConfig, recompute: bool) -> int:
    """Bytes per token after the last block: final norm and logits, then each MTP depth."""
    d = cfg.hidden_size
    head = ACT_BYTES * 2 * d + LOGIT_BYTES * cfg.vocab_size
    mtp_moe = cfg.is_moe_layer(cfg.num_hidden_layers)
    block = ACT_BYTES * 2 * d if recompute else _layer_activation_bytes(cfg, mtp_moe)
    # enorm/hnorm inputs and outputs, the concatenation fed to eh_proj, then the block and the head.
    mtp = ACT_BYTES * 6 * d + block + head
    return head + cfg.num_nextn_predict_layers * mtp


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU on the heaviest pipeline stage for one layout (see `memory_per_gpu`)."""

    weights: int
    gradients: int
    optimizer: int
    activations: int  # without recomputation
    activations_recompute: int  # full recomputation of every block
    recompute: bool  # which of the two the layout uses
    stage: int
    micro_batches_in_flight: float

    @property
    def total(self) -> int:
        act = self.activations_recompute if self.recompute else self.activations
        return self.weights + self.gradients + self.optimizer + act

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
    experts: int = 0  # routed experts, split by ep (then FSDP) and by tp

    def local(self, tp: int) -> float:
        return (self.matrices + self.experts) / tp + self.replicated

    def gathered(self, tp: int, ep: int) -> float:
        return self.matrices / tp + self.replicated + self.experts / (tp * ep)


def _block_unit(lp: LayerParams, extra_matrices: int = 0, extra_norms: int = 0) -> _Unit:
    matrices = lp.attention + lp.dense_ffn + lp.shared_experts + extra_matrices
    return _Unit(matrices, lp.norms + lp.router + extra_norms, lp.routed_experts)


@dataclass(frozen=True)
class _Profile:
    """Per-unit sizes of one config, computed once so that a layout search is plain arithmetic."""

    blocks: list[_Unit]
    acts: list[int]  # per block: activation bytes per token without recomputation
    embedding: _Unit  # on the first stage
    outputs: list[_Unit]  # final norm + head, then each MTP depth: on the last stage
    d: int
    out_act: int
    out_act_recompute: int


def _profile(cfg: ModelConfig) -> _Profile:
    d = cfg.hidden_size
    moe = [cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)]
    head = _Unit(0 if cfg.tie_word_embeddings else cfg.vocab_size * d, d)
    mtp = _block_unit(_mtp_layer(cfg), extra_matrices=2 * d * d, extra_norms=3 * d)
    return _Profile(
        blocks=[_block_unit(layer_params(cfg, m)) for m in moe],
        acts=[_layer_activation_bytes(cfg, m) for m in moe],
        embedding=_Unit(cfg.vocab_size * d, 0),
        outputs=[head] + [mtp] * cfg.num_nextn_predict_layers,
        d=d,
        out_act=_output_activation_bytes(cfg, recompute=False),
        out_act_recompute=_output_activation_bytes(cfg, recompute=True),
    )


def _stage_bounds(n_layers: int, pp: int) -> list[range]:
    """Contiguous, as-even-as-possible split of the blocks; the first stages take the remainder."""
    base, extra = divmod(n_layers, pp)
    bounds, start = [], 0
    for s in range(pp):
        size = base + (1 if s < extra else 0)
        bounds.append(range(start, start + size))
        start += size
    return bounds


def _in_flight(schedule: str, pp: int, stage: int, n_micro: int) -> float:
    """Micro-batches whose activations a stage holds at the peak of the pipeline schedule."""
    if pp == 1:
        return 1.0
    if schedule == "dualpipe":  # DeepSeek-V3 report, Table 2: PP+1 micro-batches on every rank
        return float(min(pp + 1, n_micro))
    held = float(min(pp - stage, n_micro))  # 1F1B: stage s warms up with pp - s forwards
    if schedule == "interleaved1F1B":  # Korthikanti et al. 2022, sec. 4.2.3, 2 virtual stages per rank
        held *= 1 + (pp - 1) / (2 * pp)
    return held


def _memory(
    prof: _Profile, layout: ParallelConfig, *, seq_len: int, micro_batch: int, n_micro: int, recompute: bool
) -> MemoryEstimate:
    dp_shard, tp, pp, ep, schedule = layout.dp_shard, layout.tp, layout.pp, layout.ep, layout.pp_schedule
    tokens = micro_batch * seq_len
    units = [*prof.blocks, prof.embedding, *prof.outputs]
    gathered = max(u.gathered(tp, ep) for u in units)  # the largest unit FSDP all-gathers at once
    copies = 2 if schedule == "dualpipe" and pp > 1 else 1  # DualPipe keeps two stages per rank
    best: MemoryEstimate | None = None
    for s, layers in enumerate(_stage_bounds(len(prof.blocks), pp)):
        last = s == pp - 1
        stage_units = [prof.blocks[i] for i in layers] + ([prof.embedding] if s == 0 else [])
        stage_units += prof.outputs if last else []
        params = sum(u.local(tp) for u in stage_units)
        local = copies * params / dp_shard
        if dp_shard > 1:  # FSDP2: bf16 gathered copies of the current and the prefetched layer
            weights = MASTER_BYTES * local + 2 * COMPUTE_BYTES * gathered
            grads = GRAD_BYTES * (local + gathered)
        else:  # one replica: autocast keeps a bf16 copy of every weight used in the forward
            weights, grads = (MASTER_BYTES + COMPUTE_BYTES) * local, GRAD_BYTES * local
        held = _in_flight(schedule, pp, s, n_micro)
        stage_acts = [prof.acts[i] for i in layers]
        full = held * sum(stage_acts) + (prof.out_act if last else 0)
        # Recomputation keeps each block's input and rebuilds one block at a time during backward.
        kept = held * len(stage_acts) * ACT_BYTES * prof.d + max(stage_acts, default=0)
        kept += prof.out_act_recompute if last else 0
        est = MemoryEstimate(
            weights=int(weights),
            gradients=int(grads),
            optimizer=int(OPTIM_BYTES * local),
            activations=int(full * tokens / tp),  # tp assumes sequence parallelism for the norms
            activations_recompute=int(kept * tokens / tp),
            recompute=recompute,
            stage=s,
            micro_batches_in_flight=held,
        )
        if best is None or est.total > best.total:
            best = est
    assert best is not None
    return best


def memory_per_gpu(cfg: ModelConfig, train: TrainConfig, parallel: ParallelConfig) -> MemoryEstimate:
    """Peak bytes per GPU for `parallel` at `train`'s micro-batch and sequence length.

    AdamW under FSDP2 mixed precision: fp32 master weights, fp32 gradients and fp32 m, v, all sharded
    over dp_shard (16 bytes per parameter), plus bf16 compute copies. Routed experts are split over ep
    (then FSDP over the rest of dp_shard), matrices over tp, blocks over pp stages (the heaviest stage
    is reported; the first holds the embedding, the last the head and MTP). Recomputation is on when
    either `parallel.activation_recompute` or `train.activation_checkpointing` says so.
    """
    dp = parallel.dp_replicate * parallel.dp_shard
    n_micro = max(1, train.global_batch_size // (train.micro_batch_size * dp))
    return _memory(
        _profile(cfg), parallel, seq_len=train.seq_len, micro_batch=train.micro_batch_size, n_micro=n_micro,
        recompute=parallel.activation_recompute or train.activation_checkpointing,
    )


# --------------------------------------------------------------------------------------------
# Chinchilla and hyper-parameters
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChinchillaCheck:
    """Planned tokens vs Hoffmann et al. 2022's compute-optimal 20-26 tokens per (active) parameter."""

    active_params: int
    tokens: int  # steps x global_batch_size x seq_len
    ratio_min: float
    ratio_max: float

    @property
    def required_tokens(self) -> int:
        return math.ceil(self.ratio_min * self.active_params)

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.active_params

    @property
    def verdict(self) -> str:
        r = self.tokens_per_param
        if r < self.ratio_min:
            return "under-trained"
        return "over-trained" if r > self.ratio_max else "compliant"

    @property
    def compliant(self) -> bool:
        return self.verdict == "compliant"

    def as_dict(self) -> dict[str, Any]:
        extra = ("required_tokens", "tokens_per_param", "verdict", "compliant")
        return {**asdict(self), **{p: getattr(self, p) for p in extra}}


def chinchilla_check(
    cfg: ModelConfig, train: TrainConfig, ratio_min: float = 20.0, ratio_max: float = 26.0
) -> ChinchillaCheck:
    """For an MoE the parameter count is N_active: compute per token follows active, not total, size."""
    if not 0 < ratio_min <= ratio_max:
        raise ValueError(f"need 0 < ratio_min <= ratio_max, got {ratio_min} and {ratio_max}")
    return ChinchillaCheck(count_params(cfg).active, train.total_tokens, ratio_min, ratio_max)


def lr_and_batch_for_compute(flops: float) -> tuple[float, float]:
    """Peak LR and batch size in tokens from DeepSeek LLM's fits (Bi et al. 2024, eq. 1).

    eta = 0.3118·C^-0.125 and B = 0.2920·C^0.3271, C the training FLOPs; fitted on dense models, used
    here with the active-parameter FLOPs of the MoE.
    """
    return 0.3118 * flops**-0.125, 0.2920 * flops**0.3271


# --------------------------------------------------------------------------------------------
# Plans and config selection
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Everything `dsv3 plan` reports for one run config."""

    name: str
    params: ParamCounts
    flops: FlopBreakdown
    kv_cache: KVCacheBytes
    memory: MemoryEstimate
    chinchilla: ChinchillaCheck
    parallel: ParallelConfig
    micro_batch_size: int
    suggested_lr: float
    suggested_batch_tokens: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "params": self.params.as_dict(),
            "flops_per_token": self.flops.as_dict(),
            "kv_cache_bytes_per_token": self.kv_cache.as_dict(),
            "memory_per_gpu": {
                **self.memory.as_dict(),
                "gpu_memory_gb": self.parallel.gpu_memory_gb,
                "fits": self.memory.fits(self.parallel.gpu_memory_gb),
            },
            "parallel": self.parallel.model_dump(),
            "micro_batch_size": self.micro_batch_size,
            "chinchilla": self.chinchilla.as_dict(),
            "suggested": {"lr": self.suggested_lr, "batch_tokens": self.suggested_batch_tokens},
        }


def plan_run(run: RunConfig, ratio_min: float = 20.0, ratio_max: float = 26.0, causal: bool = True) -> Plan:
    """Counts, FLOPs, KV cache, memory for the run's own layout, and its Chinchilla check."""
    flops = training_flops_per_token(run.model, run.train.seq_len, causal)
    chin = chinchilla_check(run.model, run.train, ratio_min, ratio_max)
    lr, batch = lr_and_batch_for_compute(flops.without_mtp * chin.required_tokens)
    return Plan(
        name=run.name,
        params=count_params(run.model),
        flops=flops,
        kv_cache=kv_cache_bytes_per_token(run.model),
        memory=memory_per_gpu(run.model, run.train, run.parallel),
        chinchilla=chin,
        parallel=run.parallel,
        micro_batch_size=run.train.micro_batch_size,
        suggested_lr=lr,
        suggested_batch_tokens=batch,
    )


def training_hours(
    flops: float, gpus: int, mfu: float, peak_tflops: float = H100_BF16_TFLOPS, recompute: bool = False
) -> float:
    """Wall-clock hours for `flops` model FLOPs; recomputation's extra forward lowers the useful rate."""
    seconds = flops / (gpus * peak_tflops * 1e12 * mfu)
    return seconds * (RECOMPUTE_SLOWDOWN if recompute else 1.0) / 3600


@dataclass(frozen=True)
class Choice:
    """One config judged for a GPU budget: its layout and costs when it fits, else why not."""

    name: str
    total_params: int
    active_params: int
    tokens: int  # the Chinchilla budget: ratio x N_active
    flops: float  # training FLOPs for those tokens
    fits: bool
    reason: str = ""
    parallel: ParallelConfig | None = None
    micro_batch_size: int | None = None
    memory: MemoryEstimate | None = None
    hours: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "fits": self.fits, "reason": self.reason,
            "total_params": self.total_params, "active_params": self.active_params,
            "tokens": self.tokens, "flops": self.flops, "hours": self.hours,
            "micro_batch_size": self.micro_batch_size,
            "parallel": None if self.parallel is None else self.parallel.model_dump(),
            "memory_per_gpu": None if self.memory is None else self.memory.as_dict(),
        }


def _pow2_divisors(n: int, limit: int) -> list[int]:
    return [x for x in (2**i for i in range(n.bit_length())) if n % x == 0 and x <= limit]


def _layouts(cfg: ModelConfig, train: TrainConfig, gpus: int, gpus_per_node: int):
    """Candidate layouts, simplest first: fewest pipeline stages, then tensor ranks, larger micro-batches.

    FSDP shards over every data-parallel rank (dp_shard = dp). Experts go over the node's GPUs first
    (all-to-all on NVLink, and FSDP no longer gathers whole expert sets), wider only when memory asks.
    """
    mbs_options = [m for m in range(train.micro_batch_size, 0, -1) if train.micro_batch_size % m == 0]
    for pp in [p for p in range(1, gpus + 1) if gpus % p == 0 and p <= cfg.num_hidden_layers]:
        for tp in _pow2_divisors(gpus // pp, gpus_per_node):
            if cfg.num_attention_heads % tp:
                continue
            dp = gpus // (pp * tp)
            eps = [e for e in _pow2_divisors(dp, cfg.n_routed_experts) if cfg.n_routed_experts % e == 0]
            in_node = max(e for e in eps if e <= max(1, gpus_per_node // tp))
            for mbs in mbs_options:
                if train.global_batch_size % (mbs * dp):
                    continue
                n_micro = train.global_batch_size // (mbs * dp)
                if pp > 1 and n_micro < pp:  # fewer micro-batches than stages: mostly bubble
                    continue
                for ep in (e for e in eps if e >= in_node):
                    yield ParallelConfig(gpus=gpus, dp_shard=dp, tp=tp, pp=pp, ep=ep), mbs, n_micro


def _judge(
    run: RunConfig, gpus: int, gpu_memory_gb: float, hours: float | None, mfu: float, peak_tflops: float,
    ratio: float, headroom: float, gpus_per_node: int,
) -> Choice:
    cfg, train = run.model, run.train
    counts = count_params(cfg)
    tokens = math.ceil(ratio * counts.active)
    flops = float(training_flops_per_token(cfg, train.seq_len).total) * tokens
    base = {"name": run.name, "total_params": counts.total, "active_params": counts.active,
            "tokens": tokens, "flops": flops}
    layouts = list(_layouts(cfg, train, gpus, gpus_per_node))
    if not layouts:
        return Choice(**base, fits=False, reason=(
            f"its global batch of {train.global_batch_size} sequences cannot be split over {gpus} GPUs "
            f"(data-parallel ranks <= {train.global_batch_size}, tp <= {gpus_per_node}, "
            f"pp <= {cfg.num_hidden_layers} layers)"
        ))
    prof = _profile(cfg)
    smallest = None
    for recompute in (False, True):  # recomputation costs a forward pass: only when nothing else fits
        for layout, mbs, n_micro in layouts:
            mem = _memory(prof, layout, seq_len=train.seq_len, micro_batch=mbs, n_micro=n_micro,
                          recompute=recompute)
            if not mem.fits(gpu_memory_gb, headroom):
                smallest = mem if smallest is None or mem.total < smallest.total else smallest
                continue
            layout = layout.model_copy(
                update={"activation_recompute": recompute, "gpu_memory_gb": gpu_memory_gb}
            )
            h = training_hours(flops, gpus, mfu, peak_tflops, recompute)
            late = hours is not None and h > hours
            reason = f"needs {h:,.1f} h at {mfu:.0%} MFU, more than the {hours:g} h budget" if late else ""
            return Choice(**base, fits=not late, reason=reason, parallel=layout, micro_batch_size=mbs,
                          memory=mem, hours=h)
    assert smallest is not None
    return Choice(**base, fits=False, reason=(
        f"needs at least {smallest.total / GiB:.1f} GiB per GPU in any layout (with recomputation); "
        f"{gpu_memory_gb * (1 - headroom):.1f} GiB usable of {gpu_memory_gb:g}"
    ))


def select_configs(
    runs: list[RunConfig],
    gpus: int,
    gpu_memory_gb: float,
    hours: float | None = None,
    mfu: float = 0.4,
    peak_tflops: float = H100_BF16_TFLOPS,
    ratio: float = 20.0,
    headroom: float = HEADROOM,
    gpus_per_node: int = 8,
) -> list[Choice]:
    """Judge each run for `gpus` x `gpu_memory_gb`: fitting ones first, the largest active model first.

    Per run, the simplest layout that fits wins: no recomputation before recomputation, then the order
    of `_layouts`. Time is the Chinchilla budget (`ratio` x N_active tokens) at `mfu` of `peak_tflops`.
    """
    if gpus < 1 or gpu_memory_gb <= 0 or not 0 < mfu <= 1 or (hours is not None and hours <= 0):
        raise ValueError("need gpus >= 1, gpu_memory_gb > 0, 0 < mfu <= 1 and hours > 0")
    args = (gpus, gpu_memory_gb, hours, mfu, peak_tflops, ratio, headroom, gpus_per_node)
    choices = [_judge(run, *args) for run in runs]
    return sorted(choices, key=lambda c: (not c.fits, -c.active_params, c.hours or 0.0))


# --------------------------------------------------------------------------------------------
# Reports: the tables `dsv3 plan` prints and docs/scaling.md holds
# --------------------------------------------------------------------------------------------

Section = tuple[str, list[tuple[str, list[str]]]]  # title, rows of (label, one cell per plan)


def _si(x: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.0f} {unit}"


def human_count(x: float) -> str:
    """1.24B, 205.23M: counts for people; JSON output keeps the exact integers."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{suffix}"
    return f"{x:.0f}"


def human_bytes(n: float) -> str:
    for scale, unit in ((GiB, "GiB"), (1024**2, "MiB"), (1024, "KiB")):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def describe_layout(p: ParallelConfig, gpus: bool = True) -> str:
    """'8 GPUs, dp_shard 8, ep 8': the parallel degrees above 1, the schedule when pipelined."""
    degrees = {"dp_replicate": p.dp_replicate, "dp_shard": p.dp_shard, "ep": p.ep, "tp": p.tp, "pp": p.pp}
    parts = [f"{p.gpus} GPU" + ("s" if p.gpus > 1 else "")] if gpus else []
    parts += [f"{k} {v}" for k, v in degrees.items() if v > 1]
    if p.pp > 1:
        parts.append(p.pp_schedule)
    return ", ".join(parts) or "1 GPU"


def plan_sections(plans: list[Plan]) -> list[Section]:
    """The plan as titled tables, one column per plan: one layout for the terminal and for the docs."""

    def row(label: str, fn) -> tuple[str, list[str]]:
        return label, [fn(p) for p in plans]

    def n(x: int) -> str:
        return f"{x:,}"

    return [
        ("Parameters (exact; MTP apart, not in total)", [
            row("total", lambda p: n(p.params.total)),
            row("active per token", lambda p: n(p.params.active)),
            row("embedding (input table)", lambda p: n(p.params.embedding)),
            row("output head", lambda p: n(p.params.output_head) if p.params.output_head else "tied"),
            row("attention (MLA)", lambda p: n(p.params.attention)),
            row("dense FFN", lambda p: n(p.params.dense_ffn)),
            row("routed experts", lambda p: n(p.params.routed_experts)),
            row("routed experts, active", lambda p: n(p.params.routed_experts_active)),
            row("shared experts", lambda p: n(p.params.shared_experts)),
            row("router", lambda p: n(p.params.router)),
            row("norms", lambda p: n(p.params.norms)),
            row("MTP module", lambda p: n(p.params.mtp)),
            row("MTP module, active", lambda p: n(p.params.mtp_active)),
        ]),
        ("Training FLOPs per token", [
            row("sequence length", lambda p: f"{p.flops.seq_len:,}" + (" causal" if p.flops.causal else "")),
            row("6·N_active", lambda p: _si(p.flops.matmul, "FLOP")),
            row("attention 6·L·(s/2)·H·(d_qk+d_v)", lambda p: _si(p.flops.attention, "FLOP")),
            row("MTP", lambda p: _si(p.flops.mtp, "FLOP")),
            row("total", lambda p: _si(p.flops.total, "FLOP")),
        ]),
        ("KV cache per token (all layers)", [
            row("MLA latent, bf16", lambda p: human_bytes(p.kv_cache.mla_bf16)),
            row("MLA latent, fp8", lambda p: human_bytes(p.kv_cache.mla_fp8)),
            row("multi-head equivalent, bf16", lambda p: human_bytes(p.kv_cache.mha_bf16)),
            row("multi-head equivalent, fp8", lambda p: human_bytes(p.kv_cache.mha_fp8)),
            row("MLA saving", lambda p: f"{p.kv_cache.mha_bf16 / p.kv_cache.mla_bf16:.1f}x"),
        ]),
        ("Memory per GPU (the preset's layout, heaviest pipeline stage)", [
            row("layout", lambda p: describe_layout(p.parallel)),
            row("micro-batch x sequence", lambda p: f"{p.micro_batch_size} x {p.flops.seq_len:,}"),
            row("weights", lambda p: human_bytes(p.memory.weights)),
            row("gradients", lambda p: human_bytes(p.memory.gradients)),
            row("optimizer states", lambda p: human_bytes(p.memory.optimizer)),
            row("activations", lambda p: human_bytes(p.memory.activations)),
            row("activations, recomputed", lambda p: human_bytes(p.memory.activations_recompute)),
            row("total", lambda p: human_bytes(p.memory.total) + (" (recompute)" * p.memory.recompute)),
            row(f"fits in {1 - HEADROOM:.0%} of", lambda p: f"{p.parallel.gpu_memory_gb:g} GB: "
                + ("yes" if p.memory.fits(p.parallel.gpu_memory_gb) else "NO")),
        ]),
        ("Chinchilla", [
            row("planned tokens", lambda p: human_count(p.chinchilla.tokens)),
            row(f"required ({plans[0].chinchilla.ratio_min:g} x active)" if plans else "required",
                lambda p: human_count(p.chinchilla.required_tokens)),
            row("tokens per active parameter", lambda p: f"{p.chinchilla.tokens_per_param:.1f}"),
            row("verdict", lambda p: p.chinchilla.verdict),
            row("peak lr (suggested)", lambda p: f"{p.suggested_lr:.1e}"),
            row("batch tokens (suggested)", lambda p: human_count(p.suggested_batch_tokens)),
        ]),
    ]


DOCS_COMMAND = "dsv3 plan --all --markdown > docs/scaling.md"

_CONVENTIONS = """\
## Conventions and formulas

All numbers come from `src/dsv3/scaling.py`; `dsv3 plan --config X --json` prints them exactly.

**Parameters.** Shapes are those of the Hugging Face DeepSeek-V3 modules, with no biases. Per block:
`input_layernorm` and `post_attention_layernorm` (hidden each); MLA: `q_a_proj` (hidden x q_lora_rank),
`q_a_layernorm`, `q_b_proj` (q_lora_rank x heads·qk_head_dim), or one `q_proj` when q_lora_rank is null;
`kv_a_proj_with_mqa` (hidden x (kv_lora_rank + qk_rope_head_dim)), `kv_a_layernorm`, `kv_b_proj`
(kv_lora_rank x heads·(qk_nope_head_dim + v_head_dim)), `o_proj` (heads·v_head_dim x hidden). Block i is MoE
iff `ModelConfig.is_moe_layer(i)`; a dense block has a SwiGLU MLP of width intermediate_size; an MoE block
has the router `gate.weight` (n_routed_experts x hidden; `e_score_correction_bias` is a buffer, not a
parameter), n_routed_experts SwiGLU experts of width moe_intermediate_size, and the shared experts as one
SwiGLU of width moe_intermediate_size·n_shared_experts. Then the final norm and `lm_head` (none when
`tie_word_embeddings`). "norms" counts every RMSNorm weight. The total equals
`sum(p.numel() for p in model.parameters())`, checked against transformers' `DeepseekV3ForCausalLM` on the
meta device in `tests/test_scaling.py`.

**MTP, listed apart.** Each of the num_nextn_predict_layers modules holds `enorm`, `hnorm` (hidden each),
`eh_proj` (2·hidden x hidden), one full block (MoE iff a block at index num_hidden_layers would be) and
`shared_head.norm`. It shares the main model's embedding and output head, so they are not counted again.
The published checkpoint stores its own copies of both in layer 61 (2 x 926,679,040 for DeepSeek-V3),
which is why 671B + MTP reads 685B there.

**Active per token.** Every parameter a token is multiplied through: everything but the input-embedding
table (a lookup, no FLOPs), with only num_experts_per_tok routed experts per MoE block; the router and the
shared experts count. With tied embeddings the table counts once, as the output head.

**Training FLOPs per token** (forward + backward, no recomputation; the MFU numerator):
`6·N_active + 6·L·s_eff·H·(qk_head_dim + v_head_dim)`, where the second term is the QK^T and AV products
and s_eff = s/2 under causal masking (the mean number of keys a query sees; `causal=False` gives s).
Each MTP depth adds `6·(its active parameters + vocab·hidden for the shared head)` plus its own attention
term; the total includes it, `FlopBreakdown.without_mtp` leaves it out.
Call `training_flops_per_token(cfg, seq_len, causal=True)`.

**KV cache per token** over the num_hidden_layers main blocks (MTP only drafts and is not cached). MLA caches
the compressed latent and the shared RoPE key: kv_lora_rank + qk_rope_head_dim values per layer. The
equivalent multi-head cache holds heads·(qk_head_dim + v_head_dim) values per layer. bf16 is 2 bytes per
value; fp8 is 1 byte per value plus one fp32 scale per token per layer.

**Memory per GPU** for a layout, on the heaviest pipeline stage:
- AdamW with FSDP2 mixed precision (torchtitan's recipe): fp32 master weights, fp32 gradients, fp32 m and
  v: 16 bytes per parameter, sharded over dp_shard. Routed experts are split over ep ranks (then FSDP over
  dp_shard/ep), matrices over tp (norms and router replicated), blocks over pp stages (even split, the
  first stage also holds the embedding, the last the final norm, head and MTP).
- Compute copies in bf16: with dp_shard > 1, the gathered weights of the largest FSDP unit twice (current
  and prefetched) and its fp32 unsharded gradient; on one replica, autocast's bf16 copy of every weight.
- Activations, bf16, adapted from Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
  Transformer Models") to MLA + SwiGLU/MoE with a flash-attention kernel (no s x s scores, no dropout):
  per token per block, 2 bytes x [2·hidden (norm in/out) + 2·q_lora_rank + (kv_lora_rank + qk_rope_head_dim)
  + kv_lora_rank + heads·(2·qk_head_dim + 2·v_head_dim) (q, k, v, attention output) + 2·hidden (second
  norm) + FFN], FFN = 4·intermediate_size dense, or num_experts_per_tok·(2·hidden + 4·moe_intermediate_size)
  + 4·moe_intermediate_size·n_shared_experts for MoE, plus fp32 softmax statistics (4·heads) and router
  scores (4·n_routed_experts). The last stage adds bf16 logits and their fp32 copy (6·vocab bytes per token)
  for the head and again per MTP depth. Activations are divided by tp (sequence parallelism assumed).
- With recomputation each block keeps only its input (2·hidden bytes per token) and one block is rebuilt at
  a time. Pipeline schedules hold several micro-batches: 1F1B min(pp - stage, micro-batches) on a stage,
  interleaved 1F1B that times 1 + (pp-1)/(2·pp) (two virtual stages), DualPipe pp + 1 and two copies of the
  parameters (DeepSeek-V3 report, Table 2).
- A layout fits when the total stays under 90% of the GPU's memory (GB here means GiB).

**Chinchilla.** Hoffmann et al. 2022: compute-optimal training uses 20-26 tokens per parameter; for an MoE
the parameter count is N_active, since compute per token follows it. Planned tokens are
steps x global_batch_size x seq_len. `dsv3 validate-chinchilla --strict` holds every preset to it.
Suggested peak LR and batch come from DeepSeek LLM's fits (Bi et al. 2024):
lr = 0.3118·C^-0.125, batch tokens = 0.2920·C^0.3271, with C the training FLOPs of the Chinchilla budget.

**Config selection** (`dsv3 select-config --gpus N --gpu-memory GB [--hours H] [--mfu M]`): for each preset,
FSDP over every data-parallel rank, experts over the GPUs of a node first; the first layout that fits wins,
trying no recomputation before recomputation, then fewest pipeline stages, fewest tensor ranks, largest
micro-batch. Time = the Chinchilla budget's training FLOPs / (GPUs x peak x MFU), x 4/3 with
recomputation (it repeats the forward). Those that fit (and finish within --hours) rank first, the largest
active model first.
"""


def markdown_report(plans: list[Plan]) -> str:
    """docs/scaling.md: a summary of every plan, the full tables, then the conventions behind them."""
    lines = [
        "# Scaling: parameters, FLOPs, KV cache, memory and Chinchilla budgets of the presets",
        "",
        f"Generated by `{DOCS_COMMAND}` (or `make docs`). Do not edit by hand:",
        "`tests/test_scaling.py` fails when this file and the command's output differ.",
        "",
        "| preset | total params | active params | KV cache/token (MLA bf16) | memory/GPU (layout) "
        "| Chinchilla tokens | planned tokens |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for p in plans:
        chin = p.chinchilla
        cells = [
            p.name,
            human_count(p.params.total),
            human_count(p.params.active),
            human_bytes(p.kv_cache.mla_bf16),
            f"{human_bytes(p.memory.total)} ({describe_layout(p.parallel)})",
            human_count(chin.required_tokens),
            f"{human_count(chin.tokens)} ({chin.tokens_per_param:.1f}/param)",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for title, rows in plan_sections(plans):
        lines += ["", f"## {title}", "", "| | " + " | ".join(p.name for p in plans) + " |",
                  "|---|" + "---:|" * len(plans)]
        lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    return "\n".join(lines) + "\n\n" + _CONVENTIONS
