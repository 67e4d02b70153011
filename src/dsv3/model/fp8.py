"""DeepSeek-V3's FP8 weight format: float8_e4m3fn values with one float32 scale per 128×128 block.

The published checkpoints store each linear weight W as q = W / s per block and `weight_scale_inv`
= s (the factor that dequantizes: W ≈ q·s). Pure functions, used when reading such checkpoints and
by FP8 training's quantizers (`fp8_linear`, `fp8_experts`).
"""

from __future__ import annotations

import math

import torch

__all__ = ["FP8_BLOCK", "FP8_MAX", "dequantize_fp8", "expand_scales", "gpu_kernels", "quantize_blocks",
           "quantize_fp8", "quantize_rows"]

FP8_BLOCK = (128, 128)
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
_TINY = 1e-12  # the amax of an all-zero block or row: its values stay 0


def gpu_kernels(t: torch.Tensor) -> bool:
    """Whether FP8 products on t call torch's GPU kernels (cuBLAS/CUTLASS): on CUDA, and on meta
    tensors, where only those kernels' shape and layout checks run (how the CPU tests check the GPU
    calls). Elsewhere the products are emulated in float32."""
    return t.device.type in ("cuda", "meta")


def expand_scales(scale: torch.Tensor, rows: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    """One scale per (block[0] × block[1]) block → one per element of a (rows, cols) matrix."""
    return scale.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]


def dequantize_fp8(
    w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = FP8_BLOCK
) -> torch.Tensor:
    """float8 weight (out, in) × its per-block scale (⌈out/b0⌉, ⌈in/b1⌉) → float32 (out, in)."""
    return w.float() * expand_scales(scale_inv, *w.shape, block)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) → (q float8_e4m3fn (..., K), scale float32 (...)): one scale per row, x ≈ q · scale.
    q is laid out row-major whatever x's strides (a transposed view is copied)."""
    x = x.contiguous().float()
    scale = x.abs().amax(-1).clamp_min(_TINY) / FP8_MAX
    return (x / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def quantize_blocks(w: torch.Tensor, block: tuple[int, int] = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) → (q float8_e4m3fn (N', K'), w padded with zeros to whole blocks, and its float32 scale
    per block (N'/b0, K'/b1)) with w ≈ q · scale: each block's largest |value| maps to 448. On w's device."""
    out_dim, in_dim = w.shape
    rows, cols = math.ceil(out_dim / block[0]), math.ceil(in_dim / block[1])
    padded = torch.nn.functional.pad(w.float(), (0, cols * block[1] - in_dim, 0, rows * block[0] - out_dim))
    blocks = padded.view(rows, block[0], cols, block[1])
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=_TINY) / FP8_MAX  # (rows, cols)
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(padded.shape), scale


def quantize_fp8(w: torch.Tensor, block: tuple[int, int] = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's weight format: float8_e4m3fn (out, in) and float32 `weight_scale_inv` per block."""
    q, scale_inv = quantize_blocks(w, block)
    return q[: w.shape[0], : w.shape[1]].contiguous(), scale_inv
