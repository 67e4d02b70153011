"""The scheduler: which sequences feed how many tokens this step (pure Python, no tensors).

Every step, oldest first:
1. Each running sequence gets its tokens: a decode row feeds its last token (and its speculative
   draft, when it has one and may keep two more tokens); a sequence still prefilling feeds its
   next chunk. A row whose new tokens need a block the cache cannot give preempts the newest
   running sequence (its blocks are released and it goes back to the front of the queue, to be
   recomputed from its tokens, possibly from the prefix cache), down to preempting itself.
2. If nothing was preempted, waiting sequences are admitted first come, first served while fewer
   than max_num_seqs run, the prefill forward has room and the cache can hold the first chunk
   (past a prefix-cache hit) and still keep a 1 % reserve for the running sequences.

Decode rows run in their own forward (captured in a CUDA graph on a GPU); prefill chunks run in a
padded (rows, longest chunk) forward whose size is bounded by max_num_batched_tokens, so a long
prompt is fed a chunk per step and never stalls the running sequences' decoding.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from dsv3.infer.engine.block_manager import BlockManager
from dsv3.infer.engine.config import EngineConfig
from dsv3.infer.engine.sequence import Sequence, SequenceStatus

__all__ = ["Scheduled", "Batch", "Scheduler"]


@dataclass
class Scheduled:
    """`seq` feeds token_ids[start : start + num_tokens], then `draft` when it is not None.

    A `pending` row (the engine's overlapped decode) feeds the token the step still in flight is
    sampling: it is not in `token_ids` yet, and the model runner takes it from the device. When
    speculating it also feeds the draft that step is making (`draft_pending`), and `start` assumes
    that step's own draft is rejected: the runner moves the row one position on, on the device,
    where it was accepted. Once the step in flight is read back the engine settles `start` and
    `draft` to their values."""

    seq: Sequence
    start: int
    num_tokens: int
    draft: int | None = None
    pending: bool = False
    draft_pending: bool = False

    @property
    def samples(self) -> bool:
        """Whether this step feeds the sequence's last token, so its next token is sampled."""
        return self.start + self.num_tokens == self.seq.num_tokens + self.pending

    @property
    def drafting(self) -> bool:
        """Whether the row feeds a draft after its token (known on the host or still on the device)."""
        return self.draft is not None or self.draft_pending

    @property
    def fed(self) -> list[int]:
        if self.pending:  # stand-ins: the runner copies the real ids on the device
            return [0, 0] if self.draft_pending else [0]
        tokens = self.seq.token_ids[self.start : self.start + self.num_tokens]
        return tokens if self.draft is None else [*tokens, self.draft]


@dataclass
class Batch:
    decode: list[Scheduled] = field(default_factory=list)
    prefill: list[Scheduled] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.decode or self.prefill)

    @property
    def prefill_width(self) -> int:
        return max((s.num_tokens for s in self.prefill), default=0)


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager) -> None:
        assert config.max_model_len is not None, "EngineConfig.resolved() first"
        self.config, self.blocks = config, blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.reserve = max(1, blocks.num_blocks // 100)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Take `seq` out of the queue or the batch and release its blocks now (finish, abort)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.blocks.release(seq)
        seq.status = SequenceStatus.FINISHED

    # --- one step ------------------------------------------------------------------------------
    def schedule(self) -> Batch:
        batch = Batch()
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            if seq.num_uncomputed == 1:
                draft = seq.draft if self._may_keep_two(seq) else None
                item = Scheduled(seq, seq.num_computed, 1, draft)
            else:
                chunk = self._chunk(batch, seq.num_uncomputed)
                if chunk == 0:  # the prefill forward is full: continue next step
                    i += 1
                    continue
                item = Scheduled(seq, seq.num_computed, chunk)
            if not self._make_room(seq, item.start + len(item.fed), batch):
                continue  # `seq` itself was preempted: running[i] is now the next one
            (batch.decode if item.num_tokens == 1 and item.samples else batch.prefill).append(item)
            i += 1
        if not batch.preempted:
            self.admit(batch)
        return batch

    def _may_keep_two(self, seq: Sequence) -> bool:
        """Whether a verified draft could be kept: the sequence may grow by two tokens."""
        if seq.draft is None:
            return False
        left = self.config.max_model_len - seq.num_tokens
        if seq.params.max_tokens is not None:
            left = min(left, seq.params.max_tokens - seq.num_output)
        return left >= 2

    def _chunk(self, batch: Batch, remaining: int) -> int:
        """Tokens one more prefill row may feed: (rows + 1) × widest chunk stays within the budget."""
        rows, width = len(batch.prefill), batch.prefill_width
        cap = self.config.max_num_batched_tokens // (rows + 1)
        if cap < max(width, 1):
            return 0
        return min(remaining, self.config.max_prefill_chunk, cap)

    def _make_room(self, seq: Sequence, n_tokens: int, batch: Batch) -> bool:
        """Blocks for `seq` to hold `n_tokens`, preempting the newest running sequences as needed;
        False when `seq` itself had to go."""
        while not self.blocks.can_grow(seq, n_tokens):
            victim = self.running.pop()
            self._preempt(victim, batch)
            if victim is seq:
                return False
        self.blocks.grow(seq, n_tokens)
        return True

    def _preempt(self, seq: Sequence, batch: Batch) -> None:
        self.blocks.release(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)
        self.num_preemptions += 1

    def admit(self, batch: Batch) -> None:
        """Admit waiting sequences into `batch` (step 2 above)."""
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            hits, keys = self.blocks.match_prefix(seq)
            cached = len(hits) * self.blocks.block_size
            chunk = self._chunk(batch, seq.num_tokens - cached)
            reserve = self.reserve if self.running else 0
            if chunk == 0 or not self.blocks.can_admit(hits, chunk, reserve):
                return
            self.waiting.popleft()
            self.blocks.admit(seq, hits, keys)
            self.blocks.grow(seq, cached + chunk)
            if not seq.admitted:
                seq.admitted, seq.num_cached_tokens = True, cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            item = Scheduled(seq, cached, chunk)
            (batch.decode if chunk == 1 and item.samples else batch.prefill).append(item)
