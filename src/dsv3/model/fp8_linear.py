"""FP8 training GEMMs with DeepSeek-V3's fine-grained scaling: 1×128 tiles of activations and
gradients, 128×128 blocks of weights, float32 accumulation.

One scale per small tile keeps an outlier from flattening the rest of its row (per-tensor FP8 loses
them), which is what lets DeepSeek-V3 train its linears in float8_e4m3fn throughout:

- forward  y  = x · Wᵀ : x in 1×128 tiles along its features, W in 128×128 blocks;
- dgrad    dx = dy · W : dy in 1×128 tiles along the output features, W in the same blocks;
- wgrad    dW = dyᵀ · x: both in 1×128 tiles along the tokens (the GEMM's contraction).

On a CUDA GPU the products are `F.scaled_mm` (cuBLAS's blockwise-scaled FP8 GEMM, sm90); elsewhere
they run *emulated*: the same quantized values and scales, dequantized and multiplied in float32, so
the CPU tests check exactly the arithmetic the GPU does (up to the order of the float32 sums). A
layer keeps its unquantized input for the backward (as bf16 training does; it is quantized there
along the other axis for the weight gradient) and its FP8 weight (a byte a parameter).

Dimensions: the contraction of each product must be whole tiles. Features that are not a multiple
of 128 on the input side keep the layer in bf16 (`convert_to_fp8` says which); output features and
token counts are padded with zeros where a product contracts over them (zeros add nothing).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.model.fp8 import expand_scales, gpu_kernels, quantize_blocks, quantize_rows
from dsv3.model.fp8_experts import fp8_expert_matmul
from dsv3.model.gemv import Linear, compute_dtype
from dsv3.model.moe import Experts

__all__ = ["FP8_TILE", "Fp8Linear", "convert_to_fp8", "fp8_linear", "quantize_tiles"]

log = logging.getLogger(__name__)

FP8_TILE = 128


def _pad_to_tile(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x with zeros appended along `dim` up to a multiple of FP8_TILE."""
    extra = -x.shape[dim] % FP8_TILE
    if not extra:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, extra]
    return F.pad(x, pad)


def quantize_tiles(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) with K a multiple of 128 → (q (M, K) float8_e4m3fn, scale (M, K/128) float32), one
    scale per 1×128 tile such that x ≈ q · scale (the largest |value| of a tile maps to 448)."""
    M, K = x.shape
    if K % FP8_TILE:
        raise ValueError(f"quantize_tiles: {K} columns is not a multiple of {FP8_TILE}")
    q, scale = quantize_rows(x.contiguous().view(M, K // FP8_TILE, FP8_TILE))  # a tile is a row here
    return q.view(M, K), scale


# How the right-hand operand b (K, N) of a · b is scaled, as the (rows, cols) one scale covers:
# "tiles" = 1×128 along K (a column's tile), "blocks" = 128×128. The left operand a (M, K) is always
# in 1×128 tiles along K (activations and gradients, each row's own scales).
_B_TILE = {"tiles": (FP8_TILE, 1), "blocks": (FP8_TILE, FP8_TILE)}


def _cublas_scales(
    a_scale: torch.Tensor, b_scale: torch.Tensor, b_kind: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales in `scaled_matmul`'s layout → the ones cuBLAS's blockwise GEMM takes, column-major
    ("outer dimension first"): a's tiles (M, K/128); b's tiles as (N, K/128), its blocks as
    (K/128 rounded up to 4, N/128)."""
    a_cublas = a_scale.t().contiguous().t()
    if b_kind == "tiles":
        return a_cublas, b_scale.contiguous().t()
    blocks = F.pad(b_scale, (0, 0, 0, -b_scale.shape[0] % 4))  # rows past K/128 are never read
    return a_cublas, blocks.t().contiguous().t()


def _scaled_mm(
    a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor, b_kind: str,
    out_dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    """`F.scaled_mm` with a in 1×128 tiles and b's blockwise recipe named by `b_kind`."""
    b_recipe = F.ScalingType.BlockWise1x128 if b_kind == "tiles" else F.ScalingType.BlockWise128x128
    return F.scaled_mm(a, b, a_scale, F.ScalingType.BlockWise1x128, b_scale, b_recipe, output_dtype=out_dtype)


# An opaque op for torch.compile, which (torch 2.11) cannot trace F.scaled_mm's `_scaled_mm_v2` builtin
# and would break each compiled block's graph at every FP8 linear. Its fake-tensor function is the call
# itself: under fake (and meta) tensors that runs torch's meta function, the same layout checks.
_blockwise_scaled_mm = torch.library.custom_op("dsv3::blockwise_scaled_mm", _scaled_mm, mutates_args=())
_blockwise_scaled_mm.register_fake(_scaled_mm)


def scaled_matmul(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, b_kind: str,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """a (M, K) · b (K, N) of FP8 values and their scales, accumulated in float32 → (M, N) out_dtype.
    Scales laid out like the matrices they scale: a's 1×128 tiles (M, K/128); b's "tiles"
    (K/128, N) or "blocks" (K/128, N/128)."""
    if gpu_kernels(a):
        a_cublas, b_cublas = _cublas_scales(a_scale, b_scale, b_kind)
        return _blockwise_scaled_mm(a, b, a_cublas, b_cublas, b_kind, out_dtype)
    (M, K), N = a.shape, b.shape[1]
    a32 = a.float() * expand_scales(a_scale, M, K, (1, FP8_TILE))
    b32 = b.float() * expand_scales(b_scale, K, N, _B_TILE[b_kind])
    return (a32 @ b32).to(out_dtype)


class _Fp8LinearFunction(torch.autograd.Function):
    """y = x · Wᵀ with the three GEMMs in FP8 (module docstring); x (M, K), W (N, K)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        N = weight.shape[0]
        xq, xs = quantize_tiles(x)
        wq, ws = quantize_blocks(weight)  # (N', K): zero rows past N
        y = scaled_matmul(xq, xs, wq.t(), ws.t(), "blocks", out_dtype)
        ctx.save_for_backward(x, wq, ws)  # the FP8 weight: a byte a parameter, not quantized twice
        ctx.weight_rows, ctx.weight_dtype = N, weight.dtype
        return y[:, :N]

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, wq, ws = ctx.saved_tensors
        dy = _pad_to_tile(dy, 1)  # (M, N'): contracted over the output features in dgrad
        dyq, dys = quantize_tiles(dy)
        # b = W (N', K) as a (K=N', N=K) operand, column-major as cuBLAS wants it
        dx = scaled_matmul(dyq, dys, wq.t().contiguous().t(), ws, "blocks", x.dtype)
        # dW = dyᵀ · x, contracted over the tokens: both quantized along them (padded to whole tiles)
        dyt_q, dyt_s = quantize_tiles(_pad_to_tile(dy.t(), 1))  # (N', M')
        xt_q, xt_s = quantize_tiles(_pad_to_tile(x.t(), 1))  # (K, M')
        dw = scaled_matmul(dyt_q, dyt_s, xt_q.t(), xt_s.t(), "tiles", torch.float32)
        return dx, dw[: ctx.weight_rows].to(ctx.weight_dtype), None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., K) · Wᵀ (W: (N, K)) with FP8 GEMMs forward and backward; the result in autocast's
    dtype when autocast is on, else in x's."""
    out_dtype = compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        y = _Fp8LinearFunction.apply(x.reshape(-1, x.shape[-1]).to(out_dtype), weight, out_dtype)
    return y.view(*x.shape[:-1], weight.shape[0])


class Fp8Linear(Linear):
    """A `Linear` whose products run in FP8 (`fp8_linear`); same parameters and state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight)


def convert_to_fp8(model: nn.Module) -> list[str]:
    """Make the model's GEMMs FP8 in place (before sharding or compiling it): attention's
    projections, the dense and shared-expert FFNs (blockwise, here) and the routed experts' grouped
    GEMMs (rowwise, `fp8_experts`). The router, the embedding and the output head stay as they are,
    as in DeepSeek-V3. Returns the names of the linears kept in bf16 because their input features
    are not whole 128-wide tiles."""
    kept, converted, experts = [], 0, 0
    for name, module in model.named_modules():
        if type(module) is Linear:
            if module.in_features % FP8_TILE:
                kept.append(name)
            else:
                module.__class__ = Fp8Linear
                converted += 1
        elif isinstance(module, Experts):
            module.matmul = fp8_expert_matmul
            experts += 1
    log.info("fp8: %d linears and %d routed-expert layers in FP8%s", converted, experts,
             f"; {len(kept)} linears kept in bf16 (input features not whole 128-wide tiles): "
             f"{', '.join(kept)}" if kept else "")  # fmt: skip
    return kept
