"""The block manager on its own (pure Python): allocation, reference counts, prefix keys, LRU reuse."""

from __future__ import annotations

import pytest

from dsv3.infer.engine.block_manager import BlockManager
from dsv3.infer.engine.sequence import Sequence
from dsv3.infer.sampling import SamplingParams


def _seq(tokens: list[int]) -> Sequence:
    return Sequence("r", 0, tokens, SamplingParams(), seed=0)


def _run(bm: BlockManager, seq: Sequence) -> list[int]:
    """Admit `seq` with its prefix hits, compute all but its last token, register its blocks."""
    hits, keys = bm.match_prefix(seq)
    bm.admit(seq, hits, keys)
    bm.grow(seq, seq.num_tokens)
    seq.num_computed = seq.num_tokens - 1
    bm.register(seq)
    return hits


def _computed(bm: BlockManager, tokens: list[int], n_computed: int) -> Sequence:
    """A sequence admitted without hits whose first `n_computed` tokens are computed, registered."""
    seq = _seq(tokens)
    bm.admit(seq, [], [])
    bm.grow(seq, seq.num_tokens)
    seq.num_computed = n_computed
    bm.register(seq)
    return seq


def test_blocks_are_counted_and_released_last_first():
    bm = BlockManager(num_blocks=6, block_size=4)
    seq = _seq(list(range(10)))
    assert bm.can_admit([], 10)
    bm.admit(seq, [], [])
    bm.grow(seq, 10)
    assert len(seq.block_table) == 3 and bm.num_used == 3 and bm.usage == 0.5
    assert bm.can_grow(seq, 24) and not bm.can_grow(seq, 25)  # 6 blocks hold 24 tokens
    table = list(seq.block_table)
    bm.release(seq)
    assert bm.num_used == 0 and seq.block_table == []
    assert list(bm.free)[-3:] == table[::-1]  # the tail is handed out again first


def test_a_shared_prefix_is_matched_block_by_block_and_only_once_computed():
    bm = BlockManager(num_blocks=16, block_size=4)
    system = list(range(100, 109))  # 9 tokens: two full blocks and one more
    a = _seq(system + [1, 2, 3])
    assert _run(bm, a) == []
    b = _seq(system + [7, 8])
    hits = _run(bm, b)
    # block 0 (tokens 0-3, key includes token 4) and block 1 (4-7, + token 8) are a's; block 2 differs
    assert hits == a.block_table[:2] and b.num_cached_tokens == 0  # admission bookkeeping is the scheduler's
    assert [bm.ref[x] for x in hits] == [2, 2]
    assert bm.prefix_hits == 8 and bm.prefix_queries == 12 + 11
    # the token after a block is part of its key: same 8 tokens, different 9th → only block 0 matches
    c = _seq(system[:8] + [55, 56])
    assert bm.match_prefix(c)[0] == a.block_table[:1]
    # blocks that are not computed yet are not matched (another sequence mid-prefill)
    _computed(bm, list(range(200, 213)), 4)
    assert len(bm.match_prefix(_seq(list(range(200, 213))))[0]) == 1


def test_a_prompt_never_matches_its_last_token():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = _seq(list(range(8)) + [99])
    _run(bm, a)
    exact = _seq(list(range(8)))  # two full blocks, nothing after: at least one token must be fed
    hits, _ = bm.match_prefix(exact)
    assert len(hits) == 1
    longer = _seq(list(range(8)) + [99, 5])
    assert len(bm.match_prefix(longer)[0]) == 2


def test_without_speculation_a_block_is_keyed_by_its_own_tokens():
    """No MTP layer in the cache: a prefix that ends on a block edge is reused whole."""
    bm = BlockManager(num_blocks=16, block_size=4, key_next_token=False)
    system = list(range(100, 108))  # exactly two blocks
    a = _seq(system + [1, 2, 3])
    _run(bm, a)
    b = _seq(system + [7, 8])
    assert _run(bm, b) == a.block_table[:2] and bm.prefix_hits == 8
    exact = _seq(system)  # the whole prompt cached: its last block is still fed, for the logits
    assert bm.match_prefix(exact)[0] == a.block_table[:1]
    # a computed full block registers even when no token follows it yet (a decode step's last token)
    assert len(_computed(bm, list(range(300, 308)), 8).block_keys) == 2


def test_freed_blocks_stay_matchable_until_reused_lru():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = _seq([1, 2, 3, 4, 5])
    _run(bm, a)
    bm.release(a)
    assert bm.num_used == 0
    again = _seq([1, 2, 3, 4, 5, 9])
    assert len(_run(bm, again)) == 2  # revived from the free list
    bm.release(again)
    filler = _seq(list(range(50, 58)))  # needs all 4 blocks: evicts every cached prefix
    bm.admit(filler, [], [])
    bm.grow(filler, 8)
    assert bm.by_key == {} and bm.match_prefix(_seq([1, 2, 3, 4, 5, 9])) == ([], [])


def test_a_hash_collision_cannot_share_a_wrong_block(monkeypatch):
    bm = BlockManager(num_blocks=8, block_size=2)
    monkeypatch.setattr(bm, "_key", lambda prev, tokens: 42)  # every block hashes alike
    _run(bm, _seq([1, 2, 3]))
    assert bm.match_prefix(_seq([1, 2, 3]))[0] != []
    assert bm.match_prefix(_seq([4, 5, 6])) == ([], [])  # same key, other tokens: no match


def test_prefix_caching_off_matches_nothing():
    bm = BlockManager(num_blocks=8, block_size=2, prefix_caching=False)
    _run(bm, _seq([1, 2, 3, 4, 5]))
    assert bm.match_prefix(_seq([1, 2, 3, 4, 5])) == ([], []) and bm.by_key == {}


def test_bad_sizes_are_errors():
    with pytest.raises(ValueError, match="num_blocks 0"):
        BlockManager(0, 4)
