"""Generation tests: models whose logits are decisive, so greedy choices do not hang on rounding."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from dsv3.config import ModelConfig
from dsv3.model import Transformer
from tests.conftest import base_config


@pytest.fixture
def make_config() -> Callable[..., ModelConfig]:
    """BASE without MTP (generation runs the main model) and a 128-position context."""
    return lambda **overrides: base_config(**{"num_nextn_predict_layers": 0, "max_position_embeddings": 128,
                                              **overrides})


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
