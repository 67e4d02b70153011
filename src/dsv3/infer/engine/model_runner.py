"""The model runner: turns a scheduled batch into forwards over the paged cache, samples, drafts.

A step runs up to two forwards of the main model:
- decode rows (B, T): each row's last token, plus its speculative draft when it has one (T = 2).
  The rows are padded to a batch-size bucket and the block tables to a power-of-two width, copied
  into preallocated buffers and run by a step function made once per (bucket, width, T): on a GPU
  that function is a CUDA graph replay (captured the first time the shape is needed, all graphs
  in one memory pool), on a CPU the same function runs eagerly, so tests exercise the same code.
  Attention takes the absorbed form against the gathered latent.
- prefill rows (P, longest chunk), eager and unpadded beyond the longest chunk: the expand path.
Then one sampler call for every row that reached its last token (two positions for a row that
verifies a draft), and with speculative decoding the MTP module runs over the positions the main
model just computed (the token after each as its input) to fill its own cache layer and draft the
next token: the argmax of its head at the row's last accepted position.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from dsv3.infer.cuda_graph import capture
from dsv3.infer.engine.config import EngineConfig
from dsv3.infer.engine.paged_cache import PagedBatch, PagedLatentCache
from dsv3.infer.engine.scheduler import Batch, Scheduled
from dsv3.infer.sampling import SamplingRow, sample

__all__ = ["ModelRunner", "RowResult", "batch_buckets"]

log = logging.getLogger(__name__)


def batch_buckets(max_num_seqs: int) -> list[int]:
    """Decode batch sizes a step is padded to: 1, 2, 4, 8, then every multiple of 16 (vLLM's shape)."""
    small = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    return [*small, *range(16, max_num_seqs, 16), max_num_seqs]


def _bucket(n: int, buckets: Sequence[int]) -> int:
    return next(b for b in buckets if b >= n)


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


class ModelRunner:
    def __init__(self, model: torch.nn.Module, config: EngineConfig, eos_ids: Sequence[int] = ()) -> None:
        self.model, self.config, self.eos_ids = model, config, tuple(eos_ids)
        mc = model.config
        weight = model.lm_head.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.num_layers = mc.num_hidden_layers
        self.speculative = config.speculative_tokens > 0
        if config.cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs: needs a model on a CUDA device, not {self.device}")
        self.graphs = self.device.type == "cuda" if config.cuda_graphs is None else config.cuda_graphs
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
            cache_layers,
            num_blocks,
            config.block_size,
            mc.kv_latent_dim,
            dtype=self.dtype,
            device=self.device,
            fp8=fp8,
        )
        log.info(
            "paged latent cache: %d blocks of %d tokens (%.2f GB, %s), %d layers",
            num_blocks,
            config.block_size,
            num_blocks * per_block / 1e9,
            config.kv_cache_dtype,
            cache_layers,
        )
        self._buffers: dict[int, dict[str, torch.Tensor]] = {}
        self._steps: dict[tuple, Callable[[], torch.Tensor]] = {}
        self._hidden: dict[tuple, torch.Tensor] = {}  # each decode shape's last hidden states (B, T, d)
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None

    # --- the model's pieces ----------------------------------------------------------------------
    def _hidden_states(self, ids: torch.Tensor, positions: torch.Tensor, batch: PagedBatch) -> torch.Tensor:
        h, _, _ = self.model.hidden_states(ids, positions, cache=batch.layers(0, self.num_layers))
        return h  # (B, T, d), normed

    def _mtp_states(
        self, h: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor, batch: PagedBatch
    ) -> torch.Tensor:
        """The MTP module at the positions whose main hidden states are `h`, fed the token after each."""
        cos, sin = self.model.rope(positions)
        emb = self.model.model.embed_tokens(next_ids)
        out, _ = self.model.mtp[0](h, emb, cos, sin, cache=batch.layer(self.num_layers))
        return out

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(h).float()

    # --- addresses ---------------------------------------------------------------------------------
    def _slot(self, table: Sequence[int], position: int) -> int:
        bs = self.config.block_size
        return table[position // bs] * bs + position % bs

    def _width(self, items: Sequence[Scheduled], pow2: bool) -> int:
        """Block-table width covering every row's context after this step."""
        need = max(-(-(s.start + len(s.fed)) // self.config.block_size) for s in items)
        if not pow2:
            return need
        return min(1 << (need - 1).bit_length(), self.max_blocks)

    def _tables(self, items: Sequence[Scheduled], rows: int, width: int) -> torch.Tensor:
        scratch = self.cache.scratch_block
        tables = [[*s.seq.block_table, *[scratch] * (width - len(s.seq.block_table))][:width] for s in items]
        tables += [[scratch] * width] * (rows - len(items))
        return torch.tensor(tables, dtype=torch.long)

    # --- decode forward: buffers and step functions per shape --------------------------------------
    def _buffer(self, T: int) -> dict[str, torch.Tensor]:
        if T not in self._buffers:
            B, dev = self.config.max_num_seqs, self.device
            self._buffers[T] = {
                "ids": torch.zeros(B, T, dtype=torch.long, device=dev),
                "positions": torch.zeros(B, T, dtype=torch.long, device=dev),
                "slots": torch.zeros(B, T, dtype=torch.long, device=dev),
                "draft_ids": torch.zeros(B, T, dtype=torch.long, device=dev),
                "draft_slots": torch.zeros(B, T, dtype=torch.long, device=dev),
                "tables": torch.zeros(B, self.max_blocks, dtype=torch.long, device=dev),
            }
        return self._buffers[T]

    def _step(self, kind: str, B: int, NB: int, T: int) -> Callable[[], torch.Tensor]:
        """The decode forward (`main`: hidden states) or the MTP draft (`draft`: argmax per position)
        for B rows, block tables NB wide and T tokens per row, over this shape's buffers."""
        key = (kind, B, NB, T)
        if key in self._steps:
            return self._steps[key]
        buf = self._buffer(T)
        positions, tables = buf["positions"][:B], buf["tables"][:B, :NB]
        if kind == "main":
            ids, slots = buf["ids"][:B], buf["slots"][:B]

            def step() -> torch.Tensor:
                batch = self.cache.batch(slots, tables, positions, absorb=True)
                h = self._hidden_states(ids, positions, batch)
                self._hidden[(B, NB, T)] = h
                return h
        else:
            ids, slots = buf["draft_ids"][:B], buf["draft_slots"][:B]

            def step() -> torch.Tensor:
                batch = self.cache.batch(slots, tables, positions, absorb=True)
                h = self._mtp_states(self._hidden[(B, NB, T)], ids, positions, batch)
                return self.model.lm_head(h).argmax(-1)  # (B, T)

        if self.graphs:
            step = self._graphed(step, key)
        self._steps[key] = step
        return step

    def _graphed(self, step: Callable[[], torch.Tensor], key: tuple) -> Callable[[], torch.Tensor]:
        try:
            graph, out = capture(step, self._pool)
        except RuntimeError as err:
            log.warning(
                "engine: decoding without CUDA graphs (capture of %s failed: %s)",
                key,
                str(err).splitlines()[0],
            )
            torch.cuda.synchronize()
            self.graphs = False
            return step

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay

    def _fill(self, buf: torch.Tensor, rows: list[list[int]], pad: int) -> None:
        """Copy host rows into the head of a (bucket, T) buffer, padding the rest with `pad`."""
        host = torch.full(buf.shape, pad, dtype=buf.dtype)
        host[: len(rows)] = torch.tensor(rows, dtype=buf.dtype)
        buf.copy_(host, non_blocking=True)

    # --- one step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def execute(self, batch: Batch) -> list[RowResult]:
        # A model compiled for training would recompile for every batch shape: run it eagerly here.
        with torch.compiler.set_stance("force_eager"):
            return self._execute(batch)

    def _execute(self, batch: Batch) -> list[RowResult]:
        decode, prefill = batch.decode, batch.prefill
        logits, rows, owners = [], [], []  # sampled positions: logits (V,), SamplingRow, (item, position)
        dec = self._decode_forward(decode) if decode else None
        if dec is not None:
            h = dec[0]
            positions = [(r, j) for r, s in enumerate(decode) for j in range(1 + (s.draft is not None))]
            flat = h[[r for r, _ in positions], [j for _, j in positions]]
            logits.append(self._logits(flat))
            for r, j in positions:
                rows.append(self._sampling_row(decode[r], j))
                owners.append((r, j))
        pre = self._prefill_forward(prefill) if prefill else None
        final = [r for r, s in enumerate(prefill) if s.samples]
        if final:
            h = pre[0]
            logits.append(self._logits(h[final, [prefill[r].num_tokens - 1 for r in final]]))
            rows += [self._sampling_row(prefill[r], 0) for r in final]
        out = sample(torch.cat(logits), rows) if rows else None

        results: list[RowResult] = []
        k = 0
        for s in decode:
            first = k
            k += 1 + (s.draft is not None)
            accepted = out.accepted[first] if s.draft is not None else None
            tokens = [s.draft, out.tokens[first + 1]] if accepted else [out.tokens[first]]
            taken = range(first, first + len(tokens))
            results.append(
                RowResult(s, tokens, 1 + bool(accepted), accepted, None, *self._logprobs(out, taken))
            )
        for s in prefill:
            if s.samples:
                results.append(
                    RowResult(s, [out.tokens[k]], s.num_tokens, None, None, *self._logprobs(out, [k]))
                )
                k += 1
            else:
                results.append(RowResult(s, [], s.num_tokens))
        if self.speculative:
            if dec is not None:
                self._draft_decode(results[: len(decode)], dec)
            if pre is not None:
                self._draft_prefill(results[len(decode) :], pre)
        return results

    def _logprobs(self, out, taken) -> tuple[list | None, list | None]:
        if out is None or out.logprobs is None:
            return None, None
        return [out.logprobs[i] for i in taken], [out.top_logprobs[i] for i in taken]

    def _sampling_row(self, s: Scheduled, j: int) -> SamplingRow:
        """Position j of a row's fed tokens that reached the end (j = 1: after the draft)."""
        seq = s.seq
        output = seq.output_ids if j == 0 else [*seq.output_ids, s.draft]
        banned = ()
        if len(output) < seq.params.min_tokens:
            banned = (*(() if seq.params.ignore_eos else self.eos_ids), *seq.params.stop_token_ids)
        return SamplingRow(
            seq.params, seq.seed, len(output), seq.prompt_ids, output, banned, s.draft if j == 0 else None
        )

    def _decode_forward(self, items: list[Scheduled]) -> tuple[torch.Tensor, int, int, int]:
        """Hidden states (B, T, d) of the decode rows, and the shape (T, bucket, width) it ran at."""
        B, T = len(items), 1 + any(s.draft is not None for s in items)
        Bb, NB = _bucket(B, self.buckets), self._width(items, pow2=True)
        buf, scratch = self._buffer(T), self.cache.scratch_slot
        ids, positions, slots = [], [], []
        for s in items:
            p, table = s.start, s.seq.block_table
            fed = s.fed + [0] * (T - len(s.fed))
            ids.append(fed)
            positions.append([p + j if j < len(s.fed) else 0 for j in range(T)])
            slots.append([self._slot(table, p + j) if j < len(s.fed) else scratch for j in range(T)])
        self._fill(buf["ids"][:Bb], ids, 0)
        self._fill(buf["positions"][:Bb], positions, 0)
        self._fill(buf["slots"][:Bb], slots, scratch)
        buf["tables"][:Bb, :NB].copy_(self._tables(items, Bb, NB), non_blocking=True)
        h = self._step("main", Bb, NB, T)()
        return h[:B], T, Bb, NB

    def _draft_decode(self, results: list[RowResult], dec: tuple[torch.Tensor, int, int, int]) -> None:
        """Run the MTP module over each decode row's newly computed positions; set its next draft."""
        _, T, Bb, NB = dec
        buf, scratch = self._buffer(T), self.cache.scratch_slot
        ids, slots = [], []
        for res in results:
            s, n = res.item, res.computed
            ids.append(res.tokens[:n] + [0] * (T - n))  # the token after each computed position
            slots.append([self._slot(s.seq.block_table, s.start + j) if j < n else scratch for j in range(T)])
        self._fill(buf["draft_ids"][:Bb], ids, 0)
        self._fill(buf["draft_slots"][:Bb], slots, scratch)
        drafts = self._step("draft", Bb, NB, T)()[: len(results)].tolist()
        for res, row in zip(results, drafts, strict=True):
            res.draft = row[res.computed - 1]

    def _prefill_forward(self, items: list[Scheduled]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Hidden states (P, T, d) of the prefill chunks, padded to the longest, and its inputs."""
        T, NB = max(s.num_tokens for s in items), self._width(items, pow2=False)
        scratch = self.cache.scratch_slot
        ids, positions, slots = [], [], []
        for s in items:
            n, p, table = s.num_tokens, s.start, s.seq.block_table
            ids.append(s.fed + [0] * (T - n))
            positions.append([p + j if j < n else 0 for j in range(T)])
            slots.append([self._slot(table, p + j) if j < n else scratch for j in range(T)])
        dev = self.device
        inputs = {
            "positions": torch.tensor(positions, device=dev),
            "slots": torch.tensor(slots, device=dev),
            "tables": self._tables(items, len(items), NB).to(dev),
        }
        batch = self.cache.batch(inputs["slots"], inputs["tables"], inputs["positions"], absorb=False)
        h = self._hidden_states(torch.tensor(ids, device=dev), inputs["positions"], batch)
        return h, inputs

    def _draft_prefill(self, results: list[RowResult], pre: tuple[torch.Tensor, dict]) -> None:
        """The MTP module over each chunk (fed the token after each position); drafts for final chunks."""
        h, inputs = pre
        T = h.shape[1]
        ids = []
        for res in results:
            s = res.item
            after = s.seq.token_ids[s.start + 1 : s.start + s.num_tokens + 1] + res.tokens  # the sampled one
            ids.append(after[: s.num_tokens] + [0] * (T - s.num_tokens))
        batch = self.cache.batch(inputs["slots"], inputs["tables"], inputs["positions"], absorb=False)
        states = self._mtp_states(h, torch.tensor(ids, device=self.device), inputs["positions"], batch)
        final = [r for r, res in enumerate(results) if res.item.samples]
        if final:
            last = states[final, [results[r].item.num_tokens - 1 for r in final]]
            for r, d in zip(final, self.model.lm_head(last).argmax(-1).tolist(), strict=True):
                results[r].draft = d

    # --- memory --------------------------------------------------------------------------------------
    def _blocks_from_memory(self, per_block: int, cache_layers: int, fp8: bool) -> int:
        """Cache blocks that fit: on a CPU cpu_cache_gb (no more than max_num_seqs full sequences);
        on a GPU what gpu_memory_utilization leaves after the weights and the peak activations of
        the largest prefill and decode forwards (measured on a scratch cache)."""
        cfg = self.config
        if self.device.type != "cuda":
            return min(int(cfg.cpu_cache_gb * 2**30 // per_block), cfg.max_num_seqs * self.max_blocks)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        scratch = PagedLatentCache(
            cache_layers,
            self.max_blocks,
            cfg.block_size,
            self.model.config.kv_latent_dim,
            dtype=self.dtype,
            device=self.device,
            fp8=fp8,
        )
        before = torch.cuda.memory_allocated()
        peaks = []
        chunk = min(cfg.max_prefill_chunk, cfg.max_num_batched_tokens, cfg.max_model_len)
        for rows, T, absorb in (
            (max(1, cfg.max_num_batched_tokens // chunk), chunk, False),
            (cfg.max_num_seqs, 1 + cfg.speculative_tokens, True),
        ):
            torch.cuda.reset_peak_memory_stats()
            dev = self.device
            end = cfg.max_model_len
            positions = torch.arange(end - T, end, device=dev).expand(rows, T)
            slots = torch.zeros(rows, T, dtype=torch.long, device=dev)
            tables = torch.arange(self.max_blocks, device=dev).expand(rows, self.max_blocks)
            batch = scratch.batch(slots, tables, positions, absorb=absorb)
            with torch.no_grad(), torch.compiler.set_stance("force_eager"):
                h = self._hidden_states(torch.zeros(rows, T, dtype=torch.long, device=dev), positions, batch)
                self._logits(h[:, -1])
                if self.speculative:
                    self._mtp_states(h, torch.zeros_like(positions), positions, batch)
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() - before)
            del h, batch
        del scratch
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        budget = total * cfg.gpu_memory_utilization - (total - free) - sum(peaks)
        log.info(
            "cache budget: %.2f GB (peak activations %.2f GB prefill, %.2f GB decode)",
            budget / 1e9,
            peaks[0] / 1e9,
            peaks[1] / 1e9,
        )
        return max(int(budget // per_block), 0)
