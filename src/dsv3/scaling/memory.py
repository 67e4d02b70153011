"""Memory: the KV cache per token (MLA vs multi-head) and training memory per GPU for a parallel layout."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from dsv3.config import ModelConfig, ParallelConfig, TrainConfig
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
]

GiB = 1024**3
HEADROOM = 0.1  # of GPU memory kept free for the CUDA context, NCCL buffers and fragmentation
FP8_SCALE_BYTES = 4  # one fp32 scale per token per layer for an fp8 KV cache

# Bytes per parameter for AdamW under FSDP2 mixed precision (torchtitan's recipe): fp32 sharded master
# weights, fp32 sharded gradients, fp32 Adam m and v; compute runs on bf16 copies.
MASTER_BYTES, GRAD_BYTES, OPTIM_BYTES, COMPUTE_BYTES = 4, 4, 8, 2
ACT_BYTES = 2  # activations are bf16
LOGIT_BYTES = ACT_BYTES + 4  # bf16 logits plus the fp32 copy cross-entropy works on


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
        + cfg.kv_latent_dim + cfg.kv_lora_rank  # kv_a output, kv_a_layernorm output
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
class MemoryProfile:
    """Per-unit sizes of one config, computed once so that a layout search is plain arithmetic."""

    blocks: list[_Unit]
    acts: list[int]  # per block: activation bytes per token without recomputation
    embedding: _Unit  # on the first stage
    outputs: list[_Unit]  # final norm + head, then each MTP depth: on the last stage
    d: int
    out_act: int
    out_act_recompute: int


def memory_profile(cfg: ModelConfig) -> MemoryProfile:
    """The sizes `estimate_memory` needs, per FSDP unit and per block."""
    d = cfg.hidden_size
    moe = [cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)]
    head = _Unit(0 if cfg.tie_word_embeddings else cfg.vocab_size * d, d)
    mtp = _block_unit(mtp_block_params(cfg), extra_matrices=2 * d * d, extra_norms=3 * d)
    return MemoryProfile(
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
    if schedule == "interleaved1F1B":  # Korthikanti et al. 2022, with 2 virtual stages per rank
        held *= 1 + (pp - 1) / (2 * pp)
    return held


def estimate_memory(
    prof: MemoryProfile, layout: ParallelConfig, *, seq_len: int, micro_batch: int, n_micro: int,
    recompute: bool,
) -> MemoryEstimate:
    """Peak bytes per GPU for one layout from a precomputed profile: the fast path of layout searches."""
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
    is reported; the first holds the embedding, the last the head and MTP). Activations are those of
    recomputation when `train.activation_checkpointing` is on.
    """
    dp = parallel.dp_replicate * parallel.dp_shard
    n_micro = max(1, train.global_batch_size // (train.micro_batch_size * dp))
    return estimate_memory(
        memory_profile(cfg), parallel, seq_len=train.seq_len, micro_batch=train.micro_batch_size,
        n_micro=n_micro,
        recompute=train.activation_checkpointing,
    )
