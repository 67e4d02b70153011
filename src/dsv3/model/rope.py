"""Rotary position embedding with DeepSeek-V3's YaRN context extension, as pure functions.

MLA rotates only the `qk_rope_head_dim` slice of queries and the one shared rope key. YaRN keeps
the fast (high-frequency) dimensions as they were, divides the slow ones by `factor`, and ramps
linearly in between; `attention_factor` rescales cos/sin the way transformers' `_compute_yarn_parameters`
does (1.0 when `mscale == mscale_all_dim`, as in the published config; the softmax side of YaRN is
`ModelConfig.softmax_scale`). Extending 4K → 32K → 128K is a change of `rope_scaling.factor`.
"""

from __future__ import annotations

import math

import torch

from dsv3.config import ModelConfig, RopeScaling, yarn_mscale

__all__ = ["default_inv_freq", "yarn_inv_freq", "rope_inv_freq", "rope_cos_sin", "apply_rope"]


def default_inv_freq(dim: int, theta: float) -> torch.Tensor:
    """Plain RoPE: theta^(-2i/dim) for i < dim/2, float32."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)


def _correction_dim(num_rotations: float, dim: int, theta: float, max_pos: int) -> float:
    # The dimension whose wavelength turns `num_rotations` times over the original context.
    return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))


def yarn_inv_freq(dim: int, theta: float, rs: RopeScaling) -> tuple[torch.Tensor, float]:
    """YaRN inverse frequencies (dim/2,) and the cos/sin attention factor."""
    # `or` mirrors transformers: a 0 in the config means "use the paper's default".
    beta_fast, beta_slow = rs.beta_fast or 32.0, rs.beta_slow or 1.0
    low = max(math.floor(_correction_dim(beta_fast, dim, theta, rs.original_max_position_embeddings)), 0)
    high = min(
        math.ceil(_correction_dim(beta_slow, dim, theta, rs.original_max_position_embeddings)), dim - 1
    )
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (rs.factor * pos_freqs)
    keep = 1 - ramp  # 1 for the fast dimensions (kept), 0 for the slow ones (interpolated)
    inv_freq = interpolation * (1 - keep) + extrapolation * keep
    if rs.mscale and rs.mscale_all_dim:
        attention_factor = yarn_mscale(rs.factor, rs.mscale) / yarn_mscale(rs.factor, rs.mscale_all_dim)
    else:
        attention_factor = yarn_mscale(rs.factor)
    return inv_freq, float(attention_factor)


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """The model's inverse frequencies (qk_rope_head_dim/2,) and cos/sin factor (plain RoPE or YaRN)."""
    if cfg.rope_scaling is None:
        return default_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta), 1.0
    return yarn_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling)


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, attention_factor: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (..., T, D/2) in float32 for integer `positions` (T,) or (B, T)."""
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq.to(positions.device)  # (..., T, D/2)
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x (B, T, H, D) by cos/sin (B or 1, T, D/2); the result is in half-split layout.

    `interleaved` reads the pairs as (x0, x1), (x2, x3), ... (the published weights) instead of
    (x_i, x_{i+D/2}). Either way the output puts the pair's first members in the first half: q and
    k get the same permutation, so q·k is unchanged and nothing downstream needs to undo it.
    """
    half = x.shape[-1] // 2
    x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., :half], x[..., half:])
    x1, x2 = x1.float(), x2.float()
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
