"""Paged blocks of the latent cache: allocation, reference counts and prefix caching (pure Python).

The cache is `num_blocks` blocks of `block_size` token slots; a sequence's `block_table` lists its
blocks in token order. A full block whose latent has been computed is registered under a key
that chains the previous block's key with the block's tokens; a new sequence whose prompt starts
with the same tokens takes those blocks (reference count + 1) instead of computing them. With
speculative decoding (`key_next_token`) the key also covers the token after the block, because the
MTP module's latent at a block's last position depends on it (the MTP layer is cached in the same
blocks); a prefix ending exactly on a block edge then recomputes its last block. Either way a
prompt never matches all of its own tokens: at least one is fed, to produce the next token's logits.

A block whose count drops to 0 joins the free list with its key kept: it can still be matched
until it is handed out again, oldest freed first (an LRU cache of prefixes). A sequence frees its
blocks last to first, so a prompt's tail is evicted before its head. Keys are 64-bit xxh3 hashes;
a match also compares the tokens, so a hash collision cannot share a wrong block.
"""

from __future__ import annotations

import math
from array import array
from collections import OrderedDict
from collections.abc import Sequence as Seq

import xxhash

from dsv3.infer.engine.sequence import Sequence

__all__ = ["BlockManager"]


class BlockManager:
    def __init__(
        self, num_blocks: int, block_size: int, prefix_caching: bool = True, key_next_token: bool = True
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"BlockManager: num_blocks {num_blocks} and block_size {block_size} must be ≥ 1")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.key_next_token = key_next_token
        self.ref = [0] * num_blocks
        self.key_of: list[int | None] = [None] * num_blocks
        self.tokens_of: list[tuple[int, ...] | None] = [None] * num_blocks
        self.by_key: dict[int, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # oldest first
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found

    # --- state -------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        """Blocks some sequence holds (cached but unreferenced blocks count as free)."""
        return self.num_blocks - len(self.free)

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks

    def blocks_for(self, n_tokens: int) -> int:
        return math.ceil(n_tokens / self.block_size)

    def _key(self, prev: int | None, tokens: Seq[int]) -> int:
        h = xxhash.xxh3_64()
        if prev is not None:
            h.update(prev.to_bytes(8, "little"))
        h.update(array("q", tokens).tobytes())
        return h.intdigest()

    def _block_tokens(self, seq: Sequence, i: int) -> tuple[int, ...]:
        """The tokens block i's key covers: its own, and the next one with `key_next_token`."""
        return tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size + self.key_next_token])

    # --- admission ---------------------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> tuple[list[int], list[int]]:
        """(block ids, keys) of the longest cached prefix of `seq`'s tokens."""
        blocks: list[int] = []
        keys: list[int] = []
        if not self.prefix_caching or seq.scores_prompt:
            return blocks, keys
        prev = None
        while (len(blocks) + 1) * self.block_size < seq.num_tokens:
            tokens = self._block_tokens(seq, len(blocks))
            key = self._key(prev, tokens)
            block = self.by_key.get(key)
            if block is None or self.tokens_of[block] != tokens:
                break
            blocks.append(block)
            keys.append(key)
            prev = key
        return blocks, keys

    def can_admit(self, hits: list[int], n_tokens: int, reserve: int = 0) -> bool:
        """Whether a sequence matching `hits` can get blocks for `n_tokens` more tokens and leave
        `reserve` blocks free (headroom for the running sequences' next tokens)."""
        need = self.blocks_for(len(hits) * self.block_size + n_tokens) - len(hits)
        revived = sum(1 for b in hits if self.ref[b] == 0)  # taken off the free list
        return self.num_free - revived - need >= reserve

    def admit(self, seq: Sequence, hits: list[int], keys: list[int]) -> None:
        """Give `seq` its prefix hits: those tokens count as computed."""
        for block in hits:
            if self.ref[block] == 0:
                del self.free[block]
            self.ref[block] += 1
        seq.block_table = list(hits)
        seq.block_keys = list(keys)
        seq.num_computed = len(hits) * self.block_size
        if self.prefix_caching:
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += seq.num_computed

    # --- growth and release ------------------------------------------------------------------
    def can_grow(self, seq: Sequence, n_tokens: int) -> bool:
        """Whether `seq` can hold `n_tokens` tokens in all."""
        return self.blocks_for(n_tokens) - len(seq.block_table) <= self.num_free

    def grow(self, seq: Sequence, n_tokens: int) -> None:
        """Append blocks to `seq` until it holds `n_tokens` tokens (check `can_grow` first)."""
        while len(seq.block_table) < self.blocks_for(n_tokens):
            block, _ = self.free.popitem(last=False)
            if self.key_of[block] is not None:  # evict the prefix it cached
                del self.by_key[self.key_of[block]]
                self.key_of[block] = self.tokens_of[block] = None
            self.ref[block] = 1
            seq.block_table.append(block)

    def register(self, seq: Sequence) -> None:
        """Register `seq`'s full, computed blocks for prefix matching (after a step)."""
        if not self.prefix_caching:
            return
        while True:
            i = len(seq.block_keys)
            end = (i + 1) * self.block_size
            if end > seq.num_computed or (self.key_next_token and end >= seq.num_tokens):
                return
            tokens = self._block_tokens(seq, i)
            key = self._key(seq.block_keys[-1] if seq.block_keys else None, tokens)
            seq.block_keys.append(key)
            block = seq.block_table[i]
            if key not in self.by_key and self.key_of[block] is None:
                self.by_key[key] = block
                self.key_of[block], self.tokens_of[block] = key, tokens

    def release(self, seq: Sequence) -> None:
        """Drop `seq`'s hold on its blocks, last first; unreferenced blocks become free."""
        for block in reversed(seq.block_table):
            self.ref[block] -= 1
            if self.ref[block] == 0:
                self.free[block] = None
        seq.block_table = []
        seq.block_keys = []

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks in use keep their contents)."""
        for block in range(self.num_blocks):
            self.key_of[block] = self.tokens_of[block] = None
        self.by_key.clear()
