"""DeepSeek-V3's FP8 weight format: float8_e4m3fn values with one float32 scale per 128×128 block.

The published checkpoints store each linear weight W as q = W / s per block and `weight_scale_inv`
= s (the factor that dequantizes: W ≈ q·s). Pure functions, used when reading such checkpoints.
"""

from __future__ import annotations

import math

import torch

__all__ = ["FP8_BLOCK", "dequantize_fp8", "quantize_fp8"]

FP8_BLOCK = (128, 128)


def dequantize_fp8(
    w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = FP8_BLOCK
) -> torch.Tensor:
    """float8 weight (out, in) × its per-block scale (⌈out/b0⌉, ⌈in/b1⌉) → float32 (out, in)."""
    out_dim, in_dim = w.shape
    scale = (
        scale_inv.float().repeat_interleave(block[0], 0)[:out_dim].repeat_interleave(block[1], 1)[:, :in_dim]
    )
    return w.float() * scale


def quantize_fp8(w: torch.Tensor, block: tuple[int, int] = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's weight format: float8_e4m3fn (out, in) and float32 `weight_scale_inv` per block."""
    out_dim, in_dim = w.shape
    rows, cols = math.ceil(out_dim / block[0]), math.ceil(in_dim / block[1])
    padded = torch.zeros(rows * block[0], cols * block[1], dtype=torch.float32)
    padded[:out_dim, :in_dim] = w.float()
    blocks = padded.view(rows, block[0], cols, block[1])
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)  # (rows, cols)
    scale_inv = amax / torch.finfo(torch.float8_e4m3fn).max
    q = (blocks / scale_inv[:, None, :, None]).view_as(padded)[:out_dim, :in_dim]
    return q.to(torch.float8_e4m3fn), scale_inv
