"""Exact parameter counts and training FLOPs per token of a DeepSeek-V3-style model.

Counts follow the Hugging Face DeepSeek-V3 module shapes (no biases), so they equal both
transformers' and dsv3.model's `sum(p.numel() for p in model.parameters())`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from dsv3.config import ModelConfig

__all__ = [
    "LayerParams",
    "ParamCounts",
    "FlopBreakdown",
    "layer_params",
    "mtp_block_params",
    "mtp_extra_params",
    "count_params",
    "training_flops_per_token",
]


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
    kv_a = d * cfg.kv_latent_dim
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


def mtp_extra_params(cfg: ModelConfig) -> int:
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


def mtp_block_params(cfg: ModelConfig) -> LayerParams:
    """The MTP module's decoder block: MoE iff a block at index num_hidden_layers would be."""
    return layer_params(cfg, cfg.is_moe_layer(cfg.num_hidden_layers))


def count_params(cfg: ModelConfig) -> ParamCounts:
    """Exact counts for `cfg` (see `ParamCounts` for what each field holds)."""
    layers = [layer_params(cfg, cfg.is_moe_layer(i)) for i in range(cfg.num_hidden_layers)]
    table = cfg.vocab_size * cfg.hidden_size
    mtp_block = mtp_block_params(cfg)
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
        mtp=n_mtp * (mtp_block.total + mtp_extra_params(cfg)),
        mtp_active=n_mtp * (mtp_block.active + mtp_extra_params(cfg)),
        head_matmul=table,
    )




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
