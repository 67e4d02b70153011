"""The paged latent cache: MLA's c_kv + k_pe per token and layer, in blocks that sequences share.

One tensor per kind holds every cached layer (the main layers, then the MTP layer when the engine
drafts with it): latent (layers, slots, kv_lora_rank + rope), slots = (num_blocks + 1) · block_size,
in the model's dtype or as e4m3 with one float32 scale per token and layer (`scale`). The last
block is scratch: padding tokens of a batch write there and nothing reads it unmasked.

A forward over a batch of rows (B, T) is described by a `PagedBatch`: the slot each fed token's
latent goes to (B, T), each row's block table (B, NB) and each token's position (B, T). Each
layer's `PagedLayer` (the model's `LayerCache` protocol) writes the chunk's latent at its slots,
then gathers the row's blocks into a contiguous (B, NB · block_size, width) view in token order,
so key j is position j, and masks keys past each query's position. Every shape comes from the
batch's tensors and nothing syncs with the host, so a decode step can be captured in a CUDA graph
per (batch size, block-table width).
"""

from __future__ import annotations

import torch

from dsv3.infer.cache import FP8, dequantize_per_token, quantize_per_token

__all__ = ["PagedLatentCache", "PagedBatch", "PagedLayer"]


class PagedBatch:
    """Where one forward's tokens go and what each row reads; `mask` (B, T, S) is made from positions."""

    def __init__(
        self,
        cache: PagedLatentCache,
        slots: torch.Tensor,
        block_tables: torch.Tensor,
        positions: torch.Tensor,
        absorb: bool,
    ) -> None:
        if slots.shape != positions.shape or slots.shape[0] != block_tables.shape[0]:
            raise ValueError(
                f"PagedBatch: slots {tuple(slots.shape)}, positions {tuple(positions.shape)} and "
                f"block tables {tuple(block_tables.shape)} disagree"
            )
        self.cache, self.slots, self.block_tables, self.absorb = cache, slots, block_tables, absorb
        keys = torch.arange(block_tables.shape[1] * cache.block_size, device=positions.device)  # (S,)
        self.mask = keys <= positions.unsqueeze(-1)  # (B, T, S): causal within the row's own tokens

    def layer(self, index: int) -> PagedLayer:
        return PagedLayer(self, index)

    def layers(self, start: int, stop: int) -> list[PagedLayer]:
        return [PagedLayer(self, i) for i in range(start, stop)]


class PagedLayer:
    """One cached layer's view of a `PagedBatch`: what `MLA.forward_cached` writes to and reads from.

    It holds the layer's slices (views) of the cache tensors: all a layer touches."""

    def __init__(self, batch: PagedBatch, index: int) -> None:
        self.batch = batch
        self.absorb = batch.absorb
        cache = batch.cache
        self.latent = cache.latent[index]  # (num_slots, width)
        self.scale = None if cache.scale is None else cache.scale[index]  # (num_slots,)

    def update(self, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store c_kv (B, T, r) and k_pe (B, T, rope) at the batch's slots; return every row's cached
        latent (B, S, r + rope) in the compute dtype and the mask (B, T, S)."""
        b, c = self.batch, self.batch.cache
        new = torch.cat((c_kv, k_pe), dim=-1)
        B, T, width = new.shape
        if tuple(b.slots.shape) != (B, T):
            raise ValueError(f"PagedLayer: a chunk of shape {(B, T)} for slots {tuple(b.slots.shape)}")
        slots = b.slots.reshape(-1)
        latent = self.latent
        blocks = b.block_tables.reshape(-1)
        S = b.block_tables.shape[1] * c.block_size
        if c.scale is None:
            latent.index_copy_(0, slots, new.reshape(B * T, width).to(latent.dtype))
            gathered = latent.view(-1, c.block_size, width).index_select(0, blocks)
            return gathered.view(B, S, width), b.mask
        values, scale = quantize_per_token(new.reshape(B * T, width))
        latent.view(torch.uint8).index_copy_(0, slots, values.view(torch.uint8))  # no float8 index_copy_
        self.scale.index_copy_(0, slots, scale)
        gathered = latent.view(torch.uint8).view(-1, c.block_size, width).index_select(0, blocks).view(FP8)
        scales = self.scale.view(-1, c.block_size).index_select(0, blocks)
        return dequantize_per_token(gathered.view(B, S, width), scales.view(B, S), c.dtype), b.mask


class PagedLatentCache:
    """The block pool of `num_layers` cached layers (see the module docstring)."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        width: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        fp8: bool = False,
    ) -> None:
        self.num_layers, self.num_blocks, self.block_size, self.width = (
            num_layers,
            num_blocks,
            block_size,
            width,
        )
        self.dtype, self.fp8, self.device = dtype, fp8, torch.device(device)
        self.scratch_block = num_blocks
        slots = (num_blocks + 1) * block_size
        self.latent = torch.zeros(num_layers, slots, width, dtype=FP8 if fp8 else dtype, device=self.device)
        self.scale = torch.zeros(num_layers, slots, dtype=torch.float32, device=self.device) if fp8 else None

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, width: int, dtype: torch.dtype, fp8: bool) -> int:
        per_token = width * (1 if fp8 else dtype.itemsize) + (4 if fp8 else 0)
        return num_layers * block_size * per_token

    @property
    def scratch_slot(self) -> int:
        return self.scratch_block * self.block_size

    def batch(
        self, slots: torch.Tensor, block_tables: torch.Tensor, positions: torch.Tensor, absorb: bool
    ) -> PagedBatch:
        return PagedBatch(self, slots, block_tables, positions, absorb)
