"""The model runner: turns a scheduled batch into forwards over the paged cache, samples, drafts.

A step runs up to two forwards of the main model, each over rows of (B, T) tokens: the decode rows
(each row's last token, plus its speculative draft when it has one: T = 2) and the prefill rows
(a chunk of a prompt each, padded to the longest). A forward of at most GRAPH_TOKENS padded
tokens runs through a step function made once per shape: rows padded to a batch-size bucket,
tokens to a power of two, block tables to a power-of-two width, inputs copied into preallocated
buffers. On a GPU that function is a CUDA graph, captured the first time its shape is needed (all
graphs share one memory pool), so a decode step or a short prefill (a prompt past a prefix-cache
hit) costs one launch instead of one per kernel; on a CPU the same function runs eagerly, so the
tests exercise this code. With `compile` (default: with CUDA graphs) the step functions run each
decoder block through torch.compile first (dynamic shapes: one compile per kind of block and
family such as decode or short prefill, not per shape or layer), so each captured graph replays
Inductor's fused kernels instead of one kernel per op: at batch 1 a decode step's time is mostly
its number of kernels. Longer prefills run eagerly at their exact shape. Attention takes the
absorbed form for one or two tokens a row, the expand path for longer chunks.

Then one sampler call covers every row that fed its sequence's last token (two positions for a row
that verifies a draft), and a prefill row whose request asks for prompt logprobs has the positions it
fed taken through the head as well (`_score_prompts`). With speculative decoding the MTP module runs
over the positions the main model just computed, fed the token after each, which fills its own
cache layer and drafts the next token: the argmax of its head at the row's last accepted position.
A decode group whose rows all verify a draft and pick greedily (no penalties, logprobs or banned
tokens) runs all of that as one step function instead (`_speculate`; one CUDA graph on a GPU),
since between the two forwards there is nothing the host must decide. `launch` enqueues all of it
without waiting for the device; `collect` reads the step back. A step launched before the one it
continues is read back (async scheduling) takes that step's sampled tokens, and when speculating
its drafts and acceptances, from the device: a row whose draft was accepted starts one position
later than the host assumed, so its positions and cache slots are chosen on the device between the
two the host prepared.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from dsv3.host_copy import HostCopy
from dsv3.infer.compiled import compile_dynamic, compiled_blocks
from dsv3.infer.cuda_graph import capture
from dsv3.infer.engine.config import EngineConfig
from dsv3.infer.engine.paged_cache import PagedBatch, PagedLatentCache
from dsv3.infer.engine.scheduler import Batch, Scheduled
from dsv3.infer.sampling import (
    PendingSample,
    SampleOutput,
    SamplingRow,
    device_index,
    sample_async,
    to_device,
    token_logprobs,
    top_pairs,
)
from dsv3.model.moe import indexed_expert_tokens

__all__ = ["ModelRunner", "Launched", "RowResult", "batch_buckets", "GRAPH_TOKENS"]

log = logging.getLogger(__name__)

GRAPH_TOKENS = 2048  # forwards up to this many padded tokens run as captured steps (bounds graph memory)
PROMPT_SCORE_TOKENS = 512  # prompt positions taken through the head at once (bounds the float32 logits)


def batch_buckets(max_num_seqs: int) -> list[int]:
    """Row counts a step is padded to: 1, 2, 4, 8, then every multiple of 16 (vLLM's shape)."""
    small = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    return [*small, *range(16, max_num_seqs, 16), max_num_seqs]


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


@dataclass
class RowResult:
    """What one scheduled row produced: the tokens to append (none for a non-final prefill chunk),
    how many fed tokens are now valid cache entries, and the next draft."""

    item: Scheduled
    tokens: list[int]
    computed: int
    accepted: bool | None = None  # the draft's fate, for rows that verified one
    draft: int | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    # prompt_logprobs: (the first prompt token scored, the logprobs of it and those after, their top)
    prompt: tuple[int, list[float], list[list[tuple[int, float]]], list[int]] | None = None


@dataclass
class _Forward:
    """One forward over some rows: hidden states (B, T, d) and the inputs the MTP pass reuses."""

    items: list[Scheduled]
    hidden: torch.Tensor
    shape: tuple[int, int, int] | None  # (rows, table width, tokens) of a step function; None: eager
    positions: torch.Tensor | None = None  # eager only: (B, T) and its block tables
    tables: torch.Tensor | None = None
    # rows continuing a speculative step in flight: the draft each row feeds (B,), −1 for none, and
    # whether it starts one position later than the host assumed (B,), both on the device
    drafts: torch.Tensor | None = None
    shift: torch.Tensor | None = None


@dataclass
class _Group:
    """One forward's sampling: the (row, position) pairs sampled, the sampler's pending output and,
    when speculating, the MTP module's next drafts."""

    items: list[Scheduled]
    picks: list[tuple[int, int]]
    pending: PendingSample | None
    drafts: torch.Tensor | None = None  # speculating: the next draft of each sampling row, in row order
    drafts_host: HostCopy | None = None  # the same, on its way to the host
    prompt: _PromptScores | None = None


@dataclass
class _PromptScores:
    """The logprobs of prompt tokens that a forward's rows fed (`prompt_logprobs`), on their way to
    the host: per row, the first prompt token scored and how many, in row order."""

    spans: dict[int, tuple[int, int]]
    top_counts: dict[int, int]
    host: HostCopy

    def rows(self) -> dict[int, tuple[int, list[float], list[list[tuple[int, float]]], list[int]]]:
        """Per row: the first prompt token scored, the logprobs, top pairs and ranks from it on."""
        host = {name: t.tolist() for name, t in self.host.get().items()}
        out, at = {}, 0
        for r, (first, n) in self.spans.items():
            rows = slice(at, at + n)
            tops = [[] for _ in range(n)]
            if self.top_counts[r]:
                tops = top_pairs(host["top_ids"][rows], host["top_values"][rows], [self.top_counts[r]] * n)
            out[r] = (first, host["logprobs"][rows], tops, host["ranks"][rows])
            at += n
        return out


@dataclass
class Launched:
    """A step enqueued on the device (`ModelRunner.launch`); `ModelRunner.collect` reads it back."""

    batch: Batch
    groups: list[_Group]

    def sampled(self, seq_ids: list[int]) -> torch.Tensor:
        """The token each of these sequences sampled in this step, still on the device: what a next
        step launched before this one is read back feeds them (plain decoding: one sampled
        position a row, in pick order)."""
        tokens, where = [], {}
        for g in self.groups:
            if g.pending is not None:
                tokens.append(g.pending.tokens)
                for r, _ in g.picks:
                    where[g.items[r].seq.seq_id] = len(where)
        if len(where) != sum(len(g.picks) for g in self.groups):
            raise ValueError("model runner: a step that sampled two positions of a row cannot be continued")
        flat = tokens[0] if len(tokens) == 1 else torch.cat(tokens)
        return flat[device_index([where[i] for i in seq_ids], flat.device)]  # usually a slice: same rows

    def continuation(self, seq_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Speculating: what a step launched before this one is read back feeds these sequences, on
        the device: each one's last token from this step (the one after its draft where the draft
        was accepted), whether it was (the next step then starts one position later) and its next
        draft."""
        tokens, accepted, drafts, where = [], [], [], {}
        for g in self.groups:
            if g.pending is None:
                continue
            first: dict[int, int] = {}
            for k, (r, _) in enumerate(g.picks):
                first.setdefault(r, k)
            rows = sorted(first)
            dev = g.pending.tokens.device
            drafting = [g.items[r].drafting for r in rows]
            k0 = device_index([first[r] for r in rows], dev)
            k1 = device_index([first[r] + d for r, d in zip(rows, drafting, strict=True)], dev)
            kept = g.pending.accepted[k0]
            if not all(drafting):
                kept = kept & to_device(drafting, dev, torch.bool)
            tokens.append(torch.where(kept, g.pending.tokens[k1], g.pending.tokens[k0]))
            accepted.append(kept)
            drafts.append(g.drafts)
            for r in rows:
                where[g.items[r].seq.seq_id] = len(where)
        index = device_index([where[i] for i in seq_ids], tokens[0].device)
        return tuple((t[0] if len(t) == 1 else torch.cat(t))[index] for t in (tokens, accepted, drafts))


class ModelRunner:
    def __init__(self, model: torch.nn.Module, config: EngineConfig, eos_ids: Sequence[int] = ()) -> None:
        self.model, self.config, self.eos_ids = model, config, tuple(eos_ids)
        model.pack_for_inference()  # one GEMM for each pair of linears reading the same input
        mc = model.config
        weight = model.lm_head.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.num_layers = mc.num_hidden_layers
        self.speculative = config.speculative_tokens > 0
        if config.cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs: needs a model on a CUDA device, not {self.device}")
        self.graphs = self.device.type == "cuda" if config.cuda_graphs is None else config.cuda_graphs
        self.compiled = self.graphs if config.compile is None else config.compile
        self._block_fn = compiled_blocks() if self.compiled else None  # one compile per kind of block
        self._draft_fn = compile_dynamic(self._draft_tokens) if self.compiled else self._draft_tokens
        self.max_blocks = config.blocks_per_seq()
        self.buckets = batch_buckets(config.max_num_seqs)
        cache_layers = self.num_layers + int(self.speculative)
        fp8 = config.kv_cache_dtype == "fp8"
        per_block = PagedLatentCache.bytes_per_block(
            cache_layers, config.block_size, mc.kv_latent_dim, self.dtype, fp8
        )
        num_blocks = config.num_blocks or self._blocks_from_memory(per_block, cache_layers, fp8)
        if num_blocks < self.max_blocks:
            raise ValueError(
                f"num_blocks: {num_blocks} blocks of {config.block_size} tokens cannot hold one sequence of "
                f"max_model_len {config.max_model_len} ({self.max_blocks} blocks): lower max_model_len or "
                "give the cache more memory"
            )
        self.cache = PagedLatentCache(
            cache_layers, num_blocks, config.block_size, mc.kv_latent_dim, dtype=self.dtype,
            device=self.device, fp8=fp8,
        )  # fmt: skip
        log.info(
            "paged latent cache: %d blocks of %d tokens (%.2f GB, %s), %d layers",
            num_blocks, config.block_size, num_blocks * per_block / 1e9, config.kv_cache_dtype, cache_layers,
        )  # fmt: skip
        self._buffers: dict[int, dict[str, torch.Tensor]] = {}
        self._steps: dict[tuple, Callable[[], torch.Tensor]] = {}
        self._hidden: dict[tuple, torch.Tensor] = {}  # each shape's last hidden states (B, T, d)
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None

    # --- the model's pieces ----------------------------------------------------------------------
    def _hidden_states(
        self, ids: torch.Tensor, positions: torch.Tensor, batch: PagedBatch, run_block: Callable | None = None
    ) -> torch.Tensor:
        layers = batch.layers(0, self.num_layers)
        h, _, _ = self.model.hidden_states(ids, positions, cache=layers, run_block=run_block)
        return h  # (B, T, d), normed

    def _mtp_states(
        self, h: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor, batch: PagedBatch
    ) -> torch.Tensor:
        """The MTP module at the positions whose main hidden states are `h`, fed the token after each."""
        cos, sin = self.model.rope(positions)
        emb = self.model.model.embed_tokens(next_ids)
        out, _ = self.model.mtp[0](h, emb, cos, sin, cache=batch.layer(self.num_layers))
        return out

    def _draft_tokens(self, h, next_ids, positions, batch) -> torch.Tensor:
        return self.model.lm_head(self._mtp_states(h, next_ids, positions, batch)).argmax(-1)  # (B, T)

    # --- addresses -----------------------------------------------------------------------------------
    def _rows(
        self, items: Sequence[Scheduled], T: int, valid: Sequence[int], first: Sequence[list[int]],
        offset: int = 0,
    ):  # fmt: skip
        """Per row, padded to T: `first[r]` (token ids), positions and slots, from `start + offset`; the
        first valid[r] are real, the rest write to the scratch block."""
        bs, scratch = self.config.block_size, self.cache.scratch_slot
        ids, positions, slots = [], [], []
        for s, n, tokens in zip(items, valid, first, strict=True):
            table, p = s.seq.block_table, s.start + offset
            ids.append(tokens[:T] + [0] * (T - len(tokens[:T])))
            positions.append([p + j if j < n else 0 for j in range(T)])
            slots.append([table[(p + j) // bs] * bs + (p + j) % bs if j < n else scratch for j in range(T)])
        return ids, positions, slots

    def _tables(self, items: Sequence[Scheduled], rows: int, width: int) -> torch.Tensor:
        scratch = self.cache.scratch_block
        tables = [[*s.seq.block_table, *[scratch] * (width - len(s.seq.block_table))][:width] for s in items]
        tables += [[scratch] * width] * (rows - len(items))
        return torch.tensor(tables, dtype=torch.long)

    def _width(self, items: Sequence[Scheduled]) -> int:
        """Block-table width covering every row's context after this step."""
        return max(-(-(s.start + len(s.fed) + s.draft_pending) // self.config.block_size) for s in items)

    # --- step functions over preallocated buffers, one per shape -----------------------------------
    def _bucket(self, rows: int) -> int:
        """The batch-size bucket a group of `rows` rows is padded to."""
        return next(b for b in self.buckets if b >= rows)

    def _buffer(self, T: int) -> dict[str, torch.Tensor]:
        if T not in self._buffers:
            B, dev = min(self.config.max_num_seqs, GRAPH_TOKENS // T), self.device
            # the main forward's and the draft's inputs, each a stack that one copy fills (`_fill`)
            main = torch.zeros(3, B, T, dtype=torch.long, device=dev)
            draft = torch.zeros(2, B, T, dtype=torch.long, device=dev)
            self._buffers[T] = {
                "main": main, **dict(zip(("ids", "positions", "slots"), main, strict=True)),
                "draft": draft, **dict(zip(("draft_ids", "draft_slots"), draft, strict=True)),
                "tables": torch.zeros(B, self.max_blocks, dtype=torch.long, device=dev),
            }
        return self._buffers[T]

    def _step(self, kind: str, B: int, NB: int, T: int) -> Callable[[], torch.Tensor]:
        """The main forward (`main`: hidden states), the MTP draft (`draft`: argmax per position) or
        a whole greedy speculative step (`speculate`, T = 2: see `_speculate`) for B rows, block
        tables NB wide and T tokens a row, over this shape's buffers."""
        key = (kind, B, NB, T)
        if key in self._steps:
            return self._steps[key]
        buf = self._buffer(T)
        positions, tables = buf["positions"][:B], buf["tables"][:B, :NB]
        absorb = T <= 2
        if kind == "main":
            ids, slots = buf["ids"][:B], buf["slots"][:B]

            def step() -> torch.Tensor:
                batch = self.cache.batch(slots, tables, positions, absorb)
                h = self._hidden_states(ids, positions, batch, self._block_fn)
                self._hidden[(B, NB, T)] = h
                return h
        elif kind == "draft":
            ids, slots = buf["draft_ids"][:B], buf["draft_slots"][:B]

            def step() -> torch.Tensor:
                batch = self.cache.batch(slots, tables, positions, absorb)
                return self._draft_fn(self._hidden[(B, NB, T)], ids, positions, batch)
        else:
            ids, slots = buf["ids"][:B], buf["slots"][:B]
            mtp_ids, mtp_slots = buf["draft_ids"][:B], buf["draft_slots"][:B]
            scratch = self.cache.scratch_slot

            def step() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
                h = self._hidden_states(ids, positions, self.cache.batch(slots, tables, positions, absorb),
                                        self._block_fn)  # fmt: skip
                tokens = self.model.lm_head(h).float().argmax(-1)  # (B, 2): after the token, after the draft
                accepted = tokens[:, 0] == ids[:, 1]
                # the MTP module's inputs, as `_draft` patches them: (draft, token after it) if accepted,
                # else (token,) with the second position's cache write sent to the scratch slot
                mtp_ids.copy_(torch.stack((torch.where(accepted, ids[:, 1], tokens[:, 0]), tokens[:, 1]), 1))
                mtp_slots.copy_(slots)
                mtp_slots[:, 1].masked_fill_(~accepted, scratch)
                drafts = self._draft_fn(h, mtp_ids, positions, self.cache.batch(mtp_slots, tables, positions,
                                                                                absorb))  # fmt: skip
                following = drafts.gather(1, accepted.long().unsqueeze(1)).squeeze(1)
                return tokens, torch.stack((accepted, torch.zeros_like(accepted)), 1), following

        if self.graphs:
            step = self._graphed(step, key)
        self._steps[key] = step
        return step

    @torch.no_grad()
    def warm_up(self) -> None:
        """Run the step functions once for each family of shapes the compiler specialises (1 row or
        more; 1 token a row, 2 (a draft verified, when speculating), or a longer chunk; few enough
        tokens for the MoE layers to index the expert weights, or more), so their compiles happen now
        instead of stalling requests later. The dummy rows write only to the scratch block; on a GPU
        their graphs are captured and kept for real steps."""
        width = min(2, self.max_blocks)  # the narrowest table a step function gets (see `_forward`)
        indexed = indexed_expert_tokens(self.model.config)  # more tokens: the MoE's other path
        shapes = set()  # (rows, tokens a row)
        for T in (1, 2, 4) if self.speculative else (1, 4):
            shapes |= {(1, T), (min(2, self.buckets[-1]), T)}
            shapes.add((next((b for b in self.buckets if b * T > indexed), self.buckets[-1]), T))
        # one row is a shape of its own to the compiler: its chunks (4 tokens or more) need the
        # grouped expert path compiled too, for a chunk longer than the indexed path takes
        shapes.add((1, max(4, _pow2(indexed + 1))))
        for B, T in sorted(shapes):
            buf = self._buffer(T)
            if buf["ids"].shape[0] < B:
                continue
            for name in ("ids", "draft_ids", "positions"):
                buf[name].zero_()
            for name in ("slots", "draft_slots"):
                buf[name].fill_(self.cache.scratch_slot)
            buf["tables"].fill_(self.cache.scratch_block)
            with torch.compiler.set_stance("force_eager"):
                self._step("main", B, width, T)()
                if self.speculative:
                    self._step("draft", B, width, T)()
                    if T == 2:
                        self._step("speculate", B, width, T)()

    def _graphed(self, step: Callable[[], torch.Tensor], key: tuple) -> Callable[[], torch.Tensor]:
        try:
            graph, out = capture(step, self._pool)
        except RuntimeError as err:
            log.warning("engine: running without CUDA graphs (capture of %s failed: %s)", key,
                        str(err).splitlines()[0])  # fmt: skip
            torch.cuda.synchronize()
            self.graphs = False
            return step

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay

    @staticmethod
    def _fill(stack: torch.Tensor, rows: Sequence[list[list[int]]], pads: Sequence[int]) -> None:
        """Copy host rows into the head rows of each (bucket, T) buffer of a (K, bucket, T) stack,
        padding each buffer's rest with its pad value: one copy to the device for all K."""
        _, B, T = stack.shape
        host = [r + [[pad] * T] * (B - len(r)) for r, pad in zip(rows, pads, strict=True)]
        stack.copy_(torch.tensor(host, dtype=stack.dtype), non_blocking=True)

    # --- forwards ------------------------------------------------------------------------------------
    def _forward(self, items: list[Scheduled], after: Launched | None) -> _Forward:
        """The main model over rows that each feed `item.fed`: through a step function when the padded
        shape is small enough (see the module docstring), else eagerly. A `pending` row's token (and
        draft, and where it starts, when speculating) comes from `after` on the device."""
        B, T = len(items), max(len(s.fed) for s in items)
        Bb, Tb = self._bucket(B), _pow2(T)
        if Tb == 2 and not any(s.drafting for s in items):
            Tb = 4  # 2 tokens a row are for verifying drafts: a 2-token chunk joins the longer chunks' family
        if Bb * Tb <= GRAPH_TOKENS:
            NB, drafts, shift = self._inputs(items, Bb, Tb, after)
            h = self._step("main", Bb, NB, Tb)()[:B]
            return _Forward(items, h, (Bb, NB, Tb), drafts=drafts, shift=shift)
        fed = [s.fed for s in items]
        valid = [len(f) for f in fed]
        ids, positions, slots = self._rows(items, T, valid, fed)
        dev = self.device
        pos, tables = torch.tensor(positions, device=dev), self._tables(items, B, self._width(items)).to(dev)
        slots, ids = torch.tensor(slots, device=dev), torch.tensor(ids, device=dev)
        drafts, shift = self._feed_pending(ids, pos, slots, items, T, valid, fed, after)
        batch = self.cache.batch(slots, tables, pos, absorb=T <= 2)
        h = self._hidden_states(ids, pos, batch)
        return _Forward(items, h, None, pos, tables, drafts=drafts, shift=shift)

    def _inputs(
        self, items: list[Scheduled], Bb: int, Tb: int, after: Launched | None
    ) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
        """Fill the (Bb, Tb) step buffers with these rows' inputs, patching in on the device what
        `after` is still computing (`_feed_pending`). Returns the block-table width and the pending
        rows' drafts and shifts."""
        fed = [s.fed for s in items]
        valid = [len(f) for f in fed]
        # at least 2 blocks wide: a width of 1 would be one more shape family for the compiler
        NB = min(max(2, _pow2(self._width(items))), self.max_blocks)
        ids, positions, slots = self._rows(items, Tb, valid, fed)
        buf, B = self._buffer(Tb), len(items)
        self._fill(buf["main"][:, :Bb], (ids, positions, slots), (0, 0, self.cache.scratch_slot))
        buf["tables"][:Bb, :NB].copy_(self._tables(items, Bb, NB), non_blocking=True)
        drafts, shift = self._feed_pending(
            buf["ids"][:B], buf["positions"][:B], buf["slots"][:B], items, Tb, valid, fed, after
        )
        return NB, drafts, shift

    def _fusable(self, items: list[Scheduled]) -> bool:
        """Whether a decode group runs as one greedy speculative step (`_speculate`): every row
        verifies a draft and its pick is a plain argmax (greedy, no penalties or logit bias, no
        logprobs, no tokens banned before min_tokens), and the padded shape is a step function's."""
        if not self.speculative or self._bucket(len(items)) * 2 > GRAPH_TOKENS:
            return False
        for s in items:
            p = s.seq.params
            if not (s.drafting and s.samples and s.num_tokens == 1) or p.penalized or p.logit_bias:
                return False
            if p.logprobs is not None or not p.greedy or s.seq.num_output + s.pending < p.min_tokens:
                return False
        return True

    def _speculate(self, items: list[Scheduled], after: Launched | None) -> _Group:
        """`_sample(_forward(...))` of a fusable group (`_fusable`) as one step function, one CUDA
        graph on a GPU: the main model over [token, draft], the argmax at both positions, the
        acceptance, the MTP module's patched inputs and its next draft, with no host work between
        them (the general path runs two graphs with ~20 small ops around them)."""
        B = len(items)
        Bb = self._bucket(B)
        NB, _, _ = self._inputs(items, Bb, 2, after)
        # on a GPU the graph's static outputs: the next launch reads them (`continuation`) before it
        # replays this graph again, and the host reads its pinned copies
        tokens, accepted, drafts = self._step("speculate", Bb, NB, 2)()
        picks = [(r, j) for r in range(B) for j in (0, 1)]
        pending = PendingSample(tokens[:B].flatten(), accepted[:B].flatten(), None, None, [0] * len(picks))
        group = _Group(items, picks, pending, drafts[:B])
        group.drafts_host = HostCopy({"drafts": group.drafts})
        return group

    def _feed_pending(
        self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, items: list[Scheduled], T: int,
        valid: list[int], fed: list[list[int]], after: Launched | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
        """Write into the forward's (B, T) inputs, on the device, what each `pending` row takes from
        `after`: the token it sampled and, speculating, the draft it made, moving the row one
        position on where `after` accepted the draft it verified. Returns the draft each row feeds
        and that shift (B,), when any row's draft is on the device."""
        rows = [r for r, s in enumerate(items) if s.pending]
        if not rows:
            return None, None
        if after is None:
            raise ValueError("model runner: a pending row needs the launched step it continues")
        seq_ids = [items[r].seq.seq_id for r in rows]
        index = device_index(rows, self.device)  # the common case, every row: a slice, no copy
        if not any(items[r].draft_pending for r in rows):
            ids[index, 0] = after.sampled(seq_ids)
            return None, None
        tokens, accepted, next_drafts = after.continuation(seq_ids)
        ids[index, 0] = tokens
        ids[index, 1] = next_drafts
        self._move_on(items, rows, T, valid, fed, accepted, positions=positions, slots=slots)
        if len(rows) == len(items):  # every row continues `after`: its drafts and acceptances are all
            return next_drafts, accepted.long()
        drafts = to_device([-1 if s.draft is None else s.draft for s in items], self.device, torch.long)
        drafts[index] = next_drafts
        shift = torch.zeros(len(items), dtype=torch.long, device=self.device)
        shift[index] = accepted.long()
        return drafts, shift

    def _move_on(
        self, items: list[Scheduled], rows: list[int], T: int, valid: list[int], first: list[list[int]],
        moved: torch.Tensor, **targets: torch.Tensor,
    ) -> None:  # fmt: skip
        """In each target (`positions`, `slots`: (B, T) on the device, as `_rows` lays them out), the
        given rows become what they are one position later, where `moved` (one flag per row, on the
        device) is set."""
        sub = [items[r] for r in rows], [valid[r] for r in rows], [first[r] for r in rows]
        _, positions, slots = self._rows(sub[0], T, sub[1], sub[2], offset=1)
        later = to_device([positions, slots], self.device, torch.long)  # both in one copy
        later = {"positions": later[0], "slots": later[1]}
        index = device_index(rows, self.device)
        for name, target in targets.items():
            target[index] = torch.where(moved.unsqueeze(1), later[name], target[index])

    def _draft(self, fwd: _Forward, group: _Group) -> torch.Tensor:
        """The MTP module over each row's newly computed positions, fed the token after each: the
        next draft of every sampling row (its argmax at the last of them), on the device, in row
        order. What the host does not know yet (the tokens just sampled, whether a draft was
        accepted) is patched into the inputs on the device, so the step needs no read-back here."""
        items, picks, out = fwd.items, group.picks, group.pending
        first_pick = {}
        for k, (r, _) in enumerate(picks):
            first_pick.setdefault(r, k)
        valid, following = [], []
        drafted, plain = [], []  # rows verifying a draft; other sampling rows with their last column
        for r, s in enumerate(items):
            n = len(s.fed)
            valid.append(n)
            following.append((s.seq.token_ids[s.start + 1 : s.start + n + 1] + [0] * n)[:n])
            if s.drafting:
                drafted.append(r)
            elif s.samples:
                plain.append(r)
        T = fwd.shape[2] if fwd.shape is not None else fwd.hidden.shape[1]
        ids, _, slots = self._rows(items, T, valid, following)
        if fwd.shape is not None:
            Bb, NB, Tb = fwd.shape
            buf = self._buffer(Tb)
            ids_buf, slots_buf = buf["draft_ids"][:Bb], buf["draft_slots"][:Bb]
            self._fill(buf["draft"][:, :Bb], (ids, slots), (0, self.cache.scratch_slot))
        else:
            ids_buf = torch.tensor(ids, device=self.device)
            slots_buf = torch.tensor(slots, device=self.device)

        def index(values: list[int]) -> slice | torch.Tensor:
            return device_index(values, self.device)

        if fwd.shift is not None:  # rows that start a position later where the step before kept its draft
            moving = [r for r, s in enumerate(items) if s.draft_pending]
            moved = fwd.shift[index(moving)].bool()
            self._move_on(items, moving, T, valid, following, moved, slots=slots_buf)
        last = torch.zeros(len(items), dtype=torch.long, device=self.device)  # each row's last valid column
        if plain:  # a (row, column) pair each: index tensors
            rows = to_device(plain, self.device, torch.long)
            cols = to_device([items[r].num_tokens - 1 for r in plain], self.device, torch.long)
            ids_buf[rows, cols] = out.tokens[index([first_pick[r] for r in plain])]
            last[rows] = cols
        if drafted:  # fed [token, draft]: next come (draft, token after it) if accepted, else (token,)
            rows, k0 = index(drafted), [first_pick[r] for r in drafted]
            accepted, token = out.accepted[index(k0)], out.tokens[index(k0)]
            drafts = fwd.drafts[rows] if fwd.drafts is not None else to_device(
                [items[r].draft for r in drafted], self.device, torch.long)  # fmt: skip
            ids_buf[rows, 0] = torch.where(accepted, drafts, token)
            ids_buf[rows, 1] = out.tokens[index([k + 1 for k in k0])]
            slots_buf[rows, 1] = torch.where(accepted, slots_buf[rows, 1], self.cache.scratch_slot)
            last[rows] = accepted.long()
        if fwd.shape is not None:
            drafts = self._step("draft", Bb, NB, Tb)()
        else:
            batch = self.cache.batch(slots_buf, fwd.tables, fwd.positions, absorb=T <= 2)
            drafts = self._draft_tokens(fwd.hidden, ids_buf, fwd.positions, batch)
        sampling = index(sorted(first_pick))
        return drafts[sampling].gather(1, last[sampling].unsqueeze(1)).squeeze(1)

    # --- one step ------------------------------------------------------------------------------------
    @torch.no_grad()
    def launch(self, batch: Batch, after: Launched | None = None) -> Launched:
        """Enqueue a step's forwards, sampling and drafting on the device without waiting for them.
        `after`: the launched step whose sampled tokens this one's `pending` rows feed."""
        # A model compiled for training would recompile for every batch shape: run it eagerly here.
        with torch.compiler.set_stance("force_eager"):
            groups = []
            for items in (batch.decode, batch.prefill):
                if not items:  # one group at a time: two groups may share a step function and its output
                    continue
                if self._fusable(items):
                    groups.append(self._speculate(items, after))
                else:  # a decode row feeds a sequence's last token: no prompt token to score
                    groups.append(self._sample(self._forward(items, after), prompts=items is batch.prefill))
        return Launched(batch, groups)

    def collect(self, launched: Launched) -> list[RowResult]:
        """The results of a launched step (waits for the device)."""
        results = []
        for g in launched.groups:
            results += self._results(g)
        return results

    def _sample(self, fwd: _Forward, prompts: bool = True) -> _Group:
        """Enqueue the sampling of the rows of a forward that reached their last token and, when
        speculating, the drafting of their next tokens; with `prompts`, the logprobs of the prompt
        tokens its rows fed for sequences that ask for them (`_score_prompts`)."""
        picks = [
            (r, j) for r, s in enumerate(fwd.items) if s.samples for j in range(s.num_tokens - 1, len(s.fed))
        ]
        pending = None
        if picks:
            T = fwd.hidden.shape[1]  # the picked positions of (B·T, d): usually evenly spaced, a view
            h = fwd.hidden.flatten(0, 1)[device_index([r * T + j for r, j in picks], self.device)]
            sampling = [self._sampling_row(fwd.items[r], j - fwd.items[r].num_tokens + 1) for r, j in picks]
            drafts = shift = None
            if fwd.drafts is not None:  # some drafts are on the device: the draft each pick verifies
                verifying = [k for k, (r, j) in enumerate(picks) if j == fwd.items[r].num_tokens - 1]
                drafts = torch.full((len(picks),), -1, dtype=torch.long, device=self.device)
                drafts[device_index(verifying, self.device)] = fwd.drafts[
                    device_index([picks[k][0] for k in verifying], self.device)]  # fmt: skip
                if not all(row.params.greedy for row in sampling):  # draws read the index shift
                    shift = fwd.shift[to_device([r for r, _ in picks], self.device, torch.long)]
            pending = sample_async(self.model.lm_head(h).float(), sampling, drafts, shift)
        group = _Group(fwd.items, picks, pending, prompt=self._score_prompts(fwd) if prompts else None)
        if self.speculative:
            group.drafts = self._draft(fwd, group)
            group.drafts_host = HostCopy({"drafts": group.drafts})
        return group

    def _score_prompts(self, fwd: _Forward) -> _PromptScores | None:
        """Enqueue the logprobs of the prompt tokens this forward's rows predict, for sequences that
        ask for them: the hidden state at position p scores token p + 1, from the first token not
        scored yet (a chunk recomputed after preemption is not scored twice) to the prompt's end."""
        spans, flat, targets, T = {}, [], [], fwd.hidden.shape[1]
        for r, s in enumerate(fwd.items):
            seq = s.seq
            if s.pending or not seq.scores_prompt:
                continue
            first = max(s.start, len(seq.prompt_logprobs))  # hidden positions [first, end)
            end = min(s.start + s.num_tokens, seq.num_prompt - 1)
            if end > first:
                spans[r] = (first + 1, end - first)
                flat += [r * T + p - s.start for p in range(first, end)]
                targets += seq.token_ids[first + 1 : end + 1]
        if not spans:
            return None
        top_counts = {r: fwd.items[r].seq.params.prompt_logprobs for r in spans}
        want = max(top_counts.values())
        h = fwd.hidden.flatten(0, 1)[device_index(flat, self.device)]
        targets = to_device(targets, self.device, torch.long)
        parts: dict[str, list[torch.Tensor]] = {"logprobs": [], "ranks": [], "top_values": [], "top_ids": []}
        for i in range(0, len(flat), PROMPT_SCORE_TOKENS):
            chunk = slice(i, i + PROMPT_SCORE_TOKENS)
            logits = self.model.lm_head(h[chunk]).float()
            chosen, top = token_logprobs(logits, targets[chunk], want)
            parts["logprobs"].append(chosen)
            # the token's rank in the vocabulary (1: the most likely), as vLLM reports it
            parts["ranks"].append((logits > logits.gather(1, targets[chunk].unsqueeze(1))).sum(-1) + 1)
            if top is not None:
                parts["top_values"].append(top[0])
                parts["top_ids"].append(top[1])
        return _PromptScores(spans, top_counts, HostCopy({k: torch.cat(v) for k, v in parts.items() if v}))

    def _results(self, g: _Group) -> list[RowResult]:
        out = None if g.pending is None else g.pending.result()
        taken: dict[int, list[int]] = {}
        for k, (r, _) in enumerate(g.picks):
            taken.setdefault(r, []).append(k)
        results = [self._result(s, out, taken.get(r, [])) for r, s in enumerate(g.items)]
        if g.prompt is not None:
            for r, scores in g.prompt.rows().items():
                results[r].prompt = scores
        if g.drafts_host is not None:
            for r, draft in zip(sorted(taken), g.drafts_host.get()["drafts"].tolist(), strict=True):
                results[r].draft = draft
        return results

    def _result(self, s: Scheduled, out: SampleOutput | None, ks: list[int]) -> RowResult:
        """A row's outcome from its sampled positions `ks` (none: a non-final chunk)."""
        if not ks:
            return RowResult(s, [], s.num_tokens)
        if s.draft is None:
            tokens, computed, accepted = [out.tokens[ks[0]]], s.num_tokens, None
        else:
            accepted = out.accepted[ks[0]]
            tokens = [s.draft, out.tokens[ks[1]]] if accepted else [out.tokens[ks[0]]]
            computed = 1 + accepted
        kept = ks[: len(tokens)]
        if out.logprobs is None:
            return RowResult(s, tokens, computed, accepted)
        return RowResult(s, tokens, computed, accepted, None, [out.logprobs[k] for k in kept],
                         [out.top_logprobs[k] for k in kept])  # fmt: skip

    def _sampling_row(self, s: Scheduled, j: int) -> SamplingRow:
        """Sampled position j of a row (j = 1: the position after its draft)."""
        seq = s.seq
        index = seq.num_output + j + s.pending  # a pending row's previous token is not on the host yet
        output: Sequence[int] = ()  # only penalties read the output tokens: copy them only then
        if seq.params.penalized:
            if s.pending:
                raise ValueError("model runner: penalties need every output token on the host, "
                                 "no pending rows")
            output = seq.output_ids if j == 0 else [*seq.output_ids, s.draft]
        banned = ()
        if index < seq.params.min_tokens:
            banned = (*(() if seq.params.ignore_eos else self.eos_ids), *seq.params.stop_token_ids)
        return SamplingRow(
            seq.params, seq.seed, index, seq.prompt_ids, output, banned, s.draft if j == 0 else None
        )

    # --- memory --------------------------------------------------------------------------------------
    def _blocks_from_memory(self, per_block: int, cache_layers: int, fp8: bool) -> int:
        """Cache blocks that fit: on a CPU cpu_cache_gb (no more than max_num_seqs full sequences); on
        a GPU what gpu_memory_utilization leaves after the weights, the peak activations of the largest
        eager prefill and the largest captured step (the graphs' pool stays reserved), measured on a
        scratch cache."""
        cfg = self.config
        if self.device.type != "cuda":
            return min(int(cfg.cpu_cache_gb * 2**30 // per_block), cfg.max_num_seqs * self.max_blocks)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        scratch = PagedLatentCache(
            cache_layers, self.max_blocks, cfg.block_size, self.model.config.kv_latent_dim, dtype=self.dtype,
            device=self.device, fp8=fp8,
        )  # fmt: skip
        before = torch.cuda.memory_allocated()
        chunk = min(cfg.max_prefill_chunk, cfg.max_num_batched_tokens, cfg.max_model_len)
        shapes = {  # (rows, tokens) of the largest forwards
            "eager prefill": (max(1, cfg.max_num_batched_tokens // chunk), chunk),
            "decode": (cfg.max_num_seqs, 1 + cfg.speculative_tokens),
            "captured prefill": (1, min(GRAPH_TOKENS, cfg.max_model_len)),
        }
        peaks = {}
        for name, (rows, T) in shapes.items():
            torch.cuda.reset_peak_memory_stats()
            dev, end = self.device, cfg.max_model_len
            positions = torch.arange(end - T, end, device=dev).expand(rows, T)
            slots = torch.zeros(rows, T, dtype=torch.long, device=dev)
            tables = torch.arange(self.max_blocks, device=dev).expand(rows, self.max_blocks)
            batch = scratch.batch(slots, tables, positions, absorb=T <= 2)
            with torch.no_grad(), torch.compiler.set_stance("force_eager"):
                h = self._hidden_states(torch.zeros(rows, T, dtype=torch.long, device=dev), positions, batch)
                self.model.lm_head(h[:, -2:]).float()
                if self.speculative:
                    self._draft_tokens(h, torch.zeros_like(positions), positions, batch)
            torch.cuda.synchronize()
            peaks[name] = torch.cuda.max_memory_allocated() - before
            del h, batch
        del scratch
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        activations = peaks["eager prefill"] + max(peaks["decode"], peaks["captured prefill"])
        budget = total * cfg.gpu_memory_utilization - (total - free) - activations
        log.info("cache budget: %.2f GB after peak activations of %s", budget / 1e9,
                 ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in peaks.items()))  # fmt: skip
        return max(int(budget // per_block), 0)
