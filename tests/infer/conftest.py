"""Shared builders for the generation tests: small DeepSeek-V3 configs and models with decisive logits."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from dsv3.config import ModelConfig
from dsv3.model import Transformer

# Every feature generation touches: q_lora, group-limited routing (n_group > 1), a dense first
# layer, a shared expert; v_head_dim ≠ qk_nope_head_dim so W_UK and W_UV cannot be mixed up.
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
    num_nextn_predict_layers=0,
    max_position_embeddings=128,
)
# YaRN 32 → 128 positions, with uneven mscales so the softmax scale and cos/sin factor both matter.
YARN = dict(
    type="yarn",
    factor=4.0,
    original_max_position_embeddings=32,
    beta_fast=32,
    beta_slow=1,
    mscale=1.0,
    mscale_all_dim=0.7,
)


@pytest.fixture
def make_config() -> Callable[..., ModelConfig]:
    return lambda **overrides: ModelConfig(**{**BASE, **overrides})


def scaled_model(cfg: ModelConfig, seed: int = 0, blocks: float = 25.0, head: float = 25.0) -> Transformer:
    """Our model with DeepSeek's init scaled up (std 0.006 gives near-uniform logits, where greedy
    choices hang on rounding) and a random router bias that changes which experts win."""
    model = Transformer(cfg, seed=seed).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.mul_(head if name.startswith(("model.embed_tokens", "lm_head")) else blocks)
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.3, generator=gen)
    return model


def hf_model(cfg: ModelConfig, seed: int = 0):
    """transformers' DeepseekV3ForCausalLM of `cfg`, every tensor random, the router bias included."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**cfg.to_hf_dict())).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                1 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.15 * torch.randn_like(p)
            )
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn_like(b))
    return model
