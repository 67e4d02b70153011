"""Shared builders for the model tests: small DeepSeek-V3 configs with every feature switchable."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from dsv3.config import ModelConfig

BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=12,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    routed_scaling_factor=2.5,
    first_k_dense_replace=1,
    num_nextn_predict_layers=1,
    max_position_embeddings=256,
)


@pytest.fixture
def make_config() -> Callable[..., ModelConfig]:
    """A few-layer DeepSeek-V3 config, CPU-fast; widths are multiples of 16 bytes so grouped_mm runs."""
    return lambda **overrides: ModelConfig(**{**BASE, **overrides})
