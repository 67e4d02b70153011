"""MLA: causal, equal to an explicit softmax reference, and assembled from cache-friendly pieces."""

from __future__ import annotations

import torch

from dsv3.model.attention import MLA
from dsv3.model.rope import rope_cos_sin, rope_inv_freq


def _mla(cfg, seed: int = 0) -> MLA:
    mla = MLA(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mla.parameters():
            p.normal_(0, 0.2, generator=gen)
    return mla


def _rope(cfg, positions):
    inv_freq, factor = rope_inv_freq(cfg)
    return rope_cos_sin(inv_freq, positions, factor)


def _reference(mla: MLA, x, cos, sin):
    """MLA with the attention matrix written out, as the papers define it."""
    B, T, _ = x.shape
    q_nope, q_pe = mla.query(x, cos, sin)
    c_kv, k_pe = mla.latent_kv(x, cos, sin)
    k, v = mla.expand_kv(c_kv, k_pe)
    q = torch.cat((q_nope, q_pe), -1)
    scores = torch.einsum("bthd,bshd->bhts", q, k) * mla.softmax_scale
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)
    return mla.o_proj(out.reshape(B, T, -1))


def test_sdpa_path_equals_explicit_softmax(make_config):
    for overrides in (
        {},
        {"q_lora_rank": None},
        {
            "rope_scaling": {
                "type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 16,
                "mscale_all_dim": 1.0,
            }
        },
    ):
        cfg = make_config(**overrides)
        mla = _mla(cfg)
        x = torch.randn(2, 11, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
        cos, sin = _rope(cfg, torch.arange(11))
        assert torch.allclose(mla(x, cos, sin), _reference(mla, x, cos, sin), atol=1e-5)


def test_attention_is_causal(make_config):
    cfg = make_config()
    mla = _mla(cfg)
    x = torch.randn(1, 9, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    cos, sin = _rope(cfg, torch.arange(9))
    y = mla(x, cos, sin)
    x2 = x.clone()
    x2[:, 5] += 1.0
    y2 = mla(x2, cos, sin)
    assert torch.equal(y[:, :5], y2[:, :5])
    assert not torch.allclose(y[:, 5:], y2[:, 5:])


def test_latent_is_the_small_per_token_state(make_config):
    """What a decode cache keeps: c_kv normalized to unit RMS (times its norm weight) and one rope key."""
    cfg = make_config()
    mla = _mla(cfg)
    with torch.no_grad():
        mla.kv_a_layernorm.weight.fill_(1.0)
    x = torch.randn(2, 4, cfg.hidden_size)
    c_kv, k_pe = mla.latent_kv(x, *_rope(cfg, torch.arange(4)))
    assert c_kv.shape == (2, 4, cfg.kv_lora_rank) and k_pe.shape == (2, 4, cfg.qk_rope_head_dim)
    assert torch.allclose(c_kv.pow(2).mean(-1), torch.ones(2, 4), atol=1e-4)


def test_per_sequence_positions(make_config):
    """Positions (B, T) give each sequence its own offsets (left padding, caches)."""
    cfg = make_config()
    mla = _mla(cfg)
    x = torch.randn(2, 6, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    shared = mla(x, *_rope(cfg, torch.arange(6)))
    batched = mla(x, *_rope(cfg, torch.stack([torch.arange(6), torch.arange(6) + 100])))
    assert torch.allclose(batched[0], shared[0], atol=1e-6)
    # RoPE is relative: a uniform shift of a whole sequence leaves its attention unchanged
    assert torch.allclose(batched[1], shared[1], atol=1e-4)
