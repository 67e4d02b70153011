"""RoPE/YaRN frequencies and rotation against transformers' own functions."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_ds  # noqa: E402

from dsv3.config import RopeScaling
from dsv3.model.rope import apply_rope, rope_cos_sin, rope_inv_freq, yarn_inv_freq

YARN_CASES = [
    # the published DeepSeek-V3 setting: 4K → 160K, mscale == mscale_all_dim (cos/sin factor 1)
    dict(
        factor=40.0,
        original_max_position_embeddings=4096,
        beta_fast=32,
        beta_slow=1,
        mscale=1.0,
        mscale_all_dim=1.0,
    ),
    # 4K → 32K with uneven mscales: the cos/sin factor is not 1
    dict(
        factor=8.0,
        original_max_position_embeddings=4096,
        beta_fast=32,
        beta_slow=1,
        mscale=0.9,
        mscale_all_dim=0.5,
    ),
    # no mscale_all_dim: transformers falls back to 0.1·ln(factor) + 1
    dict(
        factor=4.0,
        original_max_position_embeddings=1024,
        beta_fast=16,
        beta_slow=2,
        mscale=1.0,
        mscale_all_dim=0.0,
    ),
    # zero betas mean "the paper's defaults" in transformers
    dict(
        factor=2.0,
        original_max_position_embeddings=512,
        beta_fast=0,
        beta_slow=0,
        mscale=1.0,
        mscale_all_dim=1.0,
    ),
]


@pytest.mark.parametrize("case", YARN_CASES)
@pytest.mark.parametrize("rope_dim", [8, 64])
def test_yarn_matches_transformers_rope_init(case, rope_dim, make_config):
    cfg = make_config(qk_rope_head_dim=rope_dim, rope_scaling={"type": "yarn", **case}, rope_theta=10000.0)
    hf_cfg = transformers.DeepseekV3Config(**cfg.to_hf_dict())
    expected, expected_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg)
    got, factor = rope_inv_freq(cfg)
    assert torch.equal(got, expected)
    assert factor == pytest.approx(expected_factor, rel=1e-12)
    # and the softmax side of YaRN, the one transformers' attention applies
    assert cfg.softmax_scale == pytest.approx(
        hf_ds.yarn_apply_mscale(hf_cfg.rope_parameters, cfg.qk_head_dim**-0.5)
    )


def test_plain_rope_matches_transformers(make_config):
    cfg = make_config(qk_rope_head_dim=64, rope_theta=50000.0)
    hf_cfg = transformers.DeepseekV3Config(**cfg.to_hf_dict())
    expected, factor = hf_ds.DeepseekV3RotaryEmbedding.compute_default_rope_parameters(hf_cfg)
    got, ours_factor = rope_inv_freq(cfg)
    assert torch.equal(got, expected) and ours_factor == factor == 1.0


def test_yarn_keeps_fast_dims_and_interpolates_slow_ones():
    rs = RopeScaling(factor=8.0, original_max_position_embeddings=4096)
    base, _ = yarn_inv_freq(64, 10000.0, RopeScaling(factor=1.0, original_max_position_embeddings=4096))
    scaled, _ = yarn_inv_freq(64, 10000.0, rs)
    assert torch.equal(scaled[:4], base[:4])  # high frequencies: untouched
    assert torch.allclose(scaled[-4:], base[-4:] / 8.0)  # low frequencies: divided by the factor


def test_context_extension_is_a_config_change(make_config):
    """4K → 32K → 128K: only rope_scaling.factor changes; lower frequencies shrink monotonically."""
    freqs = []
    for factor in (1.0, 8.0, 32.0):
        rs = (
            None
            if factor == 1.0
            else {"type": "yarn", "factor": factor, "original_max_position_embeddings": 4096}
        )
        cfg = make_config(qk_rope_head_dim=64, rope_scaling=rs, max_position_embeddings=int(4096 * factor))
        freqs.append(rope_inv_freq(cfg)[0])
    assert torch.all(freqs[1] <= freqs[0]) and torch.all(freqs[2] <= freqs[1])
    assert freqs[2][-1] == pytest.approx(freqs[0][-1].item() / 32, rel=1e-6)


@pytest.mark.parametrize("interleaved", [True, False])
def test_apply_rope_matches_transformers(interleaved):
    gen = torch.Generator().manual_seed(0)
    B, T, H, D = 2, 9, 3, 16
    q, k = torch.randn(B, T, H, D, generator=gen), torch.randn(B, T, 1, D, generator=gen)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D)
    positions = torch.arange(T) + 5
    cos, sin = rope_cos_sin(inv_freq, positions, attention_factor=1.3)
    # transformers' layout: (B, H, T, D) and cos/sin duplicated to D
    freqs = positions[None, :, None].float() * inv_freq
    hf_cos, hf_sin = torch.cat((freqs, freqs), -1).cos() * 1.3, torch.cat((freqs, freqs), -1).sin() * 1.3
    apply = hf_ds.apply_rotary_pos_emb_interleave if interleaved else hf_ds.apply_rotary_pos_emb
    hq, hk = apply(q.transpose(1, 2), k.transpose(1, 2), hf_cos, hf_sin)
    assert torch.allclose(apply_rope(q, cos, sin, interleaved), hq.transpose(1, 2), atol=1e-6)
    assert torch.allclose(apply_rope(k, cos, sin, interleaved), hk.transpose(1, 2), atol=1e-6)


def test_rope_scores_depend_only_on_relative_position():
    """q·k after rotation is a function of the position difference: what lets a cache offset positions."""
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 1, 1, 8, generator=gen), torch.randn(1, 1, 1, 8, generator=gen)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)

    def score(pq: int, pk: int) -> float:
        cq, sq = rope_cos_sin(inv_freq, torch.tensor([pq]))
        ck, sk = rope_cos_sin(inv_freq, torch.tensor([pk]))
        return (apply_rope(q, cq, sq, True) * apply_rope(k, ck, sk, True)).sum().item()

    assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-5)
    assert not math.isclose(score(7, 3), score(7, 5), abs_tol=1e-3)
