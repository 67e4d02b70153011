"""MLA's latent KV cache: per layer and token only c_kv and the shared rope key k_pe.

That is kv_lora_rank + qk_rope_head_dim values per token per layer (576 for DeepSeek-V3, against
128·(192 + 128) for the per-head keys and values a multi-head cache would hold). Stored in the
model's dtype, or as float8 e4m3 with one float32 scale per token per layer (the figure
`dsv3.scaling.kv_cache_bytes_per_token` counts).

The buffers are allocated once for `max_len` columns. Rows are left-padded to a common prompt
length, so every row writes the same columns each step and `pad[b]` columns at the left of row b
are masked out; a token's position (for RoPE) is its column minus its row's padding.

Use: `reserve(T)` claims the next T columns (host bookkeeping), `prepare()` computes the chunk's
positions and attention mask on the device, then `model(ids, positions, cache=cache)`; each layer's
MLA calls `cache[i].update(c_kv, k_pe)`. Writes go through `index_copy_` at a device column and,
with `static=True`, reads span all `max_len` columns behind the mask: a decode step then has fixed
shapes and no host sync, so it can be captured in a CUDA graph (see `dsv3.infer.generate`).
"""

from __future__ import annotations

import torch

from dsv3.config import ModelConfig

__all__ = ["FP8_MAX", "LatentCache", "LayerCache", "quantize_per_token", "dequantize_per_token"]

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
_TINY = 1e-12  # floor of a token's absolute maximum: an all-zero latent must not divide by zero


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., D) → e4m3 values (..., D) and one float32 scale per vector (...,): x ≈ values · scale."""
    scale = x.abs().amax(-1).float().clamp(min=_TINY) / FP8_MAX
    return (x.float() / scale.unsqueeze(-1)).to(FP8), scale


def dequantize_per_token(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `quantize_per_token`, in `dtype` (e4m3 converts exactly to bf16 and wider)."""
    return values.to(dtype) * scale.unsqueeze(-1).to(dtype)


class LayerCache:
    """One layer's view of a `LatentCache`: what `MLA.forward_cached` writes to and reads from."""

    def __init__(self, owner: LatentCache, layer: int) -> None:
        self.owner = owner
        self.latent = owner.latent[layer]  # (B, max_len, kv_lora_rank + rope)
        self.scale = None if owner.scale is None else owner.scale[layer]  # (B, max_len) for fp8

    @property
    def absorb(self) -> bool:
        """The absorbed form for a decode step (one column), the expand path for a prompt."""
        return self.owner.absorb and self.owner.cols.numel() == 1

    def update(self, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the chunk's c_kv (B, T, r) and k_pe (B, T, rope) at the reserved columns; return the
        cached latent (B, S, r + rope) in the compute dtype and the chunk's mask (B, T, S)."""
        o = self.owner
        if o.mask is None:
            raise RuntimeError("LatentCache: call reserve(T) and prepare() before the forward")
        new = torch.cat((c_kv, k_pe), dim=-1)
        if new.shape[:2] != (o.batch_size, o.cols.shape[0]):
            raise ValueError(
                f"LatentCache: got a chunk of shape {tuple(new.shape[:2])}, reserved "
                f"({o.batch_size}, {o.cols.shape[0]})"
            )
        if self.scale is None:
            self.latent.index_copy_(1, o.cols, new.to(self.latent.dtype))
            return self.latent[:, : o.window], o.mask
        values, scale = quantize_per_token(new)
        # index_copy_ has no float8 kernel: copy the bytes
        self.latent.view(torch.uint8).index_copy_(1, o.cols, values.view(torch.uint8))
        self.scale.index_copy_(1, o.cols, scale)
        return dequantize_per_token(self.latent[:, : o.window], self.scale[:, : o.window], o.dtype), o.mask


class LatentCache:
    """The latent cache of every main layer for `batch_size` left-padded rows of up to `max_len` tokens.

    `dtype` is the compute dtype (what layers get back); `fp8` stores e4m3 values with per-token
    scales. `pad` (B,) counts each row's left-padding columns. `absorb=False` makes decode expand
    the latent like prefill does (a reference for tests and benchmarks, not a faster path).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        fp8: bool = False,
        pad: torch.Tensor | None = None,
        static: bool = False,
        absorb: bool = True,
    ) -> None:
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"LatentCache: batch_size {batch_size} and max_len {max_len} must be positive")
        self.batch_size, self.max_len = batch_size, max_len
        self.dtype, self.fp8, self.static, self.absorb = dtype, fp8, static, absorb
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        width = cfg.kv_latent_dim
        shape = (cfg.num_hidden_layers, batch_size, max_len, width)
        self.latent = torch.zeros(shape, dtype=FP8 if fp8 else dtype, device=self.device)
        self.scale = torch.zeros(shape[:-1], dtype=torch.float32, device=self.device) if fp8 else None
        if pad is None:
            pad = torch.zeros(batch_size, dtype=torch.long)
        if pad.shape != (batch_size,):
            raise ValueError(f"LatentCache: pad has shape {tuple(pad.shape)}, expected ({batch_size},)")
        self.pad = pad.to(self.device, torch.long)
        self.length = 0  # columns written (host-side: the same for every row)
        self.window = 0  # columns a layer reads: the written ones, or all max_len when static
        self._col = torch.zeros(1, dtype=torch.long, device=self.device)  # a decode step's column
        self.cols = self._col
        self.mask: torch.Tensor | None = None
        self._layers = [LayerCache(self, i) for i in range(cfg.num_hidden_layers)]

    def __getitem__(self, layer: int) -> LayerCache:
        return self._layers[layer]

    def __len__(self) -> int:
        return len(self._layers)

    def bytes_per_token(self) -> int:
        """Cache bytes one token of context costs over all layers (values plus fp8 scales)."""
        per_layer = self.latent.shape[-1] * self.latent.element_size()
        if self.scale is not None:
            per_layer += self.scale.element_size()
        return self.latent.shape[0] * per_layer

    def reserve(self, n_tokens: int) -> None:
        """Claim the next `n_tokens` columns for the coming forward (host bookkeeping only)."""
        start = self.length
        if n_tokens < 1 or start + n_tokens > self.max_len:
            raise ValueError(
                f"LatentCache: {n_tokens} more tokens after {start} exceed max_len {self.max_len}"
            )
        self.length = start + n_tokens
        self.window = self.max_len if self.static else self.length
        if n_tokens == 1:  # in place, so a captured decode step reads the new column
            self.cols = self._col.fill_(start)
        else:
            self.cols = torch.arange(start, start + n_tokens, device=self.device)
        self.mask = None

    def prepare(self) -> torch.Tensor:
        """Positions (B, T) of the reserved columns' tokens, and the chunk's attention mask for the
        layers; device work only, so it belongs inside a captured decode step."""
        keys = torch.arange(self.window, device=self.device)  # (S,)
        query = self.cols.unsqueeze(-1)  # (T, 1)
        mask = (keys >= self.pad.view(-1, 1, 1)) & (keys <= query)  # (B, T, S)
        self.mask = mask | (keys == query)  # a padding query sees itself: its softmax stays finite
        return (self.cols - self.pad.unsqueeze(-1)).clamp(min=0)
