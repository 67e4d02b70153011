"""The scheduler on its own (pure Python): admission, chunked prefill, budgets, preemption, drafts."""

from __future__ import annotations

from dsv3.infer.engine.block_manager import BlockManager
from dsv3.infer.engine.config import EngineConfig
from dsv3.infer.engine.scheduler import Scheduler
from dsv3.infer.engine.sequence import Sequence, SequenceStatus
from dsv3.infer.sampling import SamplingParams


def _scheduler(num_blocks=64, block_size=4, **cfg) -> Scheduler:
    config = EngineConfig(block_size=block_size, num_blocks=num_blocks, max_model_len=64, **cfg)
    return Scheduler(config, BlockManager(num_blocks, block_size))


def _seq(n: int, start: int = 0, **params) -> Sequence:
    return Sequence("r", 0, list(range(start, start + n)), SamplingParams(**params), seed=0)


def _finish_step(sched: Scheduler, batch, token: int = 7) -> None:
    """What the engine does after a step: count fed tokens, append a sampled token where one was."""
    for item in batch.decode + batch.prefill:
        item.seq.num_computed += item.num_tokens
        if item.samples:
            item.seq.token_ids.append(token)


def test_admits_up_to_max_num_seqs_and_decodes_every_step():
    sched = _scheduler(max_num_seqs=2)
    seqs = [_seq(5, 10 * i) for i in range(3)]
    for s in seqs:
        sched.add(s)
    batch = sched.schedule()
    assert [i.seq for i in batch.prefill] == seqs[:2] and [i.num_tokens for i in batch.prefill] == [5, 5]
    assert seqs[2].status is SequenceStatus.WAITING
    _finish_step(sched, batch)
    batch = sched.schedule()
    assert [(i.seq, i.start, i.num_tokens) for i in batch.decode] == [(seqs[0], 5, 1), (seqs[1], 5, 1)]
    sched.finish(seqs[0])  # retired: its place goes to the waiting one in the same step's admission
    _finish_step(sched, batch)
    batch = sched.schedule()
    assert [i.seq for i in batch.decode] == [seqs[1]] and [i.seq for i in batch.prefill] == [seqs[2]]


def test_chunked_prefill_feeds_a_long_prompt_beside_decoding():
    sched = _scheduler(max_prefill_chunk=8)
    short, long = _seq(3), _seq(30, 100)
    sched.add(short)
    _finish_step(sched, sched.schedule())
    sched.add(long)
    chunks = []
    while long.num_computed < long.num_tokens - 1 or not chunks:
        batch = sched.schedule()
        assert [i.seq for i in batch.decode] == [short]  # decoding goes on every step
        chunks += [(i.start, i.num_tokens, i.samples) for i in batch.prefill]
        _finish_step(sched, batch)
    assert chunks == [(0, 8, False), (8, 8, False), (16, 8, False), (24, 6, True)]


def test_the_prefill_forward_stays_within_its_budget():
    """rows × longest chunk ≤ max_num_batched_tokens: a long prompt leaves room for fewer rows."""
    sched = _scheduler(max_num_batched_tokens=16, max_prefill_chunk=16, max_num_seqs=8)
    for i in range(5):
        sched.add(_seq(4, 10 * i))
    batch = sched.schedule()
    assert len(batch.prefill) == 4 and len(batch.prefill) * batch.prefill_width <= 16
    sched2 = _scheduler(max_num_batched_tokens=16, max_prefill_chunk=16)
    sched2.add(_seq(30))
    sched2.add(_seq(4, 50))
    batch = sched2.schedule()
    assert [(i.num_tokens) for i in batch.prefill] == [16]  # the second row would double the width


def test_a_full_cache_preempts_the_newest_sequence_which_is_recomputed_later():
    # 7 blocks of 4 tokens; two prompts of 11 tokens take 3 blocks each; at 13 tokens both need a 4th
    sched = _scheduler(num_blocks=7, max_num_seqs=4)
    old, new = _seq(11), _seq(11, 50)
    sched.add(old)
    sched.add(new)
    batch = sched.schedule()
    assert len(batch.prefill) == 2 and sched.blocks.num_free == 1
    _finish_step(sched, batch)  # each has 12 tokens, 11 computed: the 12th fits in block 3
    batch = sched.schedule()
    assert len(batch.decode) == 2 and not batch.preempted
    _finish_step(sched, batch)  # 13 tokens: the next feed needs a 4th block
    batch = sched.schedule()
    assert batch.preempted == [new] and [i.seq for i in batch.decode] == [old]
    assert new.status is SequenceStatus.WAITING and new.num_computed == 0 and new.block_table == []
    assert list(sched.waiting) == [new] and sched.num_preemptions == 1
    assert new.token_ids[-2:] == [7, 7]  # its tokens are kept: recompute feeds them all again
    sched.finish(old)
    batch = sched.schedule()
    assert [(i.seq, i.start, i.num_tokens) for i in batch.prefill] == [(new, 0, 13)]


def test_a_sequence_that_cannot_grow_alone_preempts_itself():
    sched = _scheduler(num_blocks=4, max_num_seqs=4)  # 16 token slots in all
    a = _seq(14)
    sched.add(a)
    _finish_step(sched, sched.schedule())
    _finish_step(sched, sched.schedule())  # 16 tokens, 15 computed
    a.token_ids.append(7)  # a 17th token: its feed needs a 5th block
    a.num_computed = 16
    batch = sched.schedule()
    assert batch.preempted == [a] and not batch


def test_drafts_are_verified_only_when_two_more_tokens_may_be_kept():
    sched = _scheduler(speculative_tokens=1)
    a, b = _seq(4, max_tokens=10), _seq(4, 20, max_tokens=2)
    for s in (a, b):
        sched.add(s)
    _finish_step(sched, sched.schedule())
    a.draft = b.draft = 99
    batch = sched.schedule()
    assert [(i.seq, i.draft, i.fed) for i in batch.decode] == [(a, 99, [7, 99]), (b, None, [7])]
    assert len(a.block_table) == 2  # room for the draft's position: 6 tokens in blocks of 4


def test_a_prefix_hit_starts_the_prefill_after_the_cached_blocks():
    sched = _scheduler()
    first = _seq(13)
    sched.add(first)
    _finish_step(sched, sched.schedule())
    sched.blocks.register(first)
    second = Sequence("s", 0, list(range(13)) + [40, 41], SamplingParams(), seed=0)
    sched.add(second)
    batch = sched.schedule()
    item = batch.prefill[0]
    assert (item.seq, item.start, item.num_tokens) == (second, 12, 3)
    assert second.num_cached_tokens == 12 and second.block_table[:3] == first.block_table[:3]
