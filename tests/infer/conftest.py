"""Generation tests: models whose logits are decisive, so greedy choices do not hang on rounding."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

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


def text_checkpoint(directory: Path, mtp: bool = True, seed: int = 0) -> Path:
    """A servable checkpoint directory: a BPE tokenizer trained on the fixture corpus (with its chat
    template) and a scaled random model over its vocabulary, with an MTP module when `mtp`."""
    from dsv3.data.tokenizer import copy_tokenizer, load_tokenizer, train_tokenizer
    from dsv3.model.hf import save_hf
    from tests.conftest import FIXTURE_TEXT

    paragraphs = [p for p in FIXTURE_TEXT.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    tok_path = train_tokenizer(paragraphs, vocab_size=256 + 5 + 60, out_dir=directory / "tokenizer")
    vocab = load_tokenizer(tok_path).get_vocab_size()
    cfg = base_config(vocab_size=vocab, num_nextn_predict_layers=int(mtp), max_position_embeddings=256)
    model = scaled_model(cfg, seed=seed, blocks=5.0, head=5.0)
    save_hf(model, directory / "model")
    copy_tokenizer(tok_path, directory / "model")
    return directory / "model"


@pytest.fixture(scope="session")
def served_checkpoint(tmp_path_factory) -> Path:
    """`text_checkpoint` once per test session (read-only: tests must not change it)."""
    return text_checkpoint(tmp_path_factory.mktemp("served"))
