"""The engine: requests in, a scheduler step and a model-runner step at a time, outputs out.

    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=64))
    engine.add_request("a", "Once upon a time", SamplingParams(max_tokens=32))
    while engine.has_unfinished_requests():
        for out in engine.step():          # every request that advanced this step
            print(out.request_id, out.outputs[0].text, out.finished)
    engine.abort_request("b")              # frees its cache blocks at once

A request becomes `n` sequences (each with its own seed: the request's, or one the engine draws).
After each step the engine appends the sampled tokens, decodes text incrementally, applies the
stop rules in vLLM's order (eos unless ignore_eos, stop token ids, stop strings, max_tokens, the
context length) and retires finished sequences at once, so their blocks serve the next step.
Counters for the server's /metrics live in `EngineStats`.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from dsv3.infer.engine.block_manager import BlockManager
from dsv3.infer.engine.config import EngineConfig
from dsv3.infer.engine.model_runner import Launched, ModelRunner, RowResult
from dsv3.infer.engine.scheduler import Batch, Scheduled, Scheduler
from dsv3.infer.engine.sequence import Sequence
from dsv3.infer.sampling import SamplingParams
from dsv3.infer.tokenizer import IncrementalDetokenizer, TextTokenizer

log = logging.getLogger(__name__)

__all__ = ["LLMEngine", "RequestOutput", "CompletionOutput", "EngineStats", "RequestError"]

THROUGHPUT_WINDOW_S = 10.0  # tokens/s on /metrics is measured over the last this many seconds


class RequestError(ValueError):
    """A request the engine cannot take, naming the field (`field`) at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length", "abort" or None while running
    stop_reason: int | str | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    arrival_time: float
    first_token_time: float | None
    finish_time: float | None
    # with SamplingParams.prompt_logprobs: each prompt token's logprob (None for the first, which
    # nothing predicts) and the top logprobs at its position; filled as the prompt is computed
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_ranks: list[int | None] | None = None  # each prompt token's rank in the vocabulary (1: top)


@dataclass
class EngineStats:
    """Counters since start (monotonic time), read by /metrics."""

    prompt_tokens: int = 0  # prompt tokens of admitted requests
    generation_tokens: int = 0
    requests_finished: int = 0
    preemptions: int = 0
    spec_drafts: int = 0  # drafts verified
    spec_accepted: int = 0
    steps: int = 0
    recent: deque = field(default_factory=deque)  # (time, tokens generated) per step in the window

    def record_step(self, now: float, tokens: int) -> None:
        self.steps += 1
        self.generation_tokens += tokens
        self.recent.append((now, tokens))
        while self.recent and self.recent[0][0] < now - THROUGHPUT_WINDOW_S:
            self.recent.popleft()

    def tokens_per_second(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        recent = list(self.recent)  # one C-level copy: /metrics reads while the engine thread appends
        tokens = sum(n for t, n in recent if t >= now - THROUGHPUT_WINDOW_S)
        return tokens / THROUGHPUT_WINDOW_S

    @property
    def acceptance_rate(self) -> float | None:
        return self.spec_accepted / self.spec_drafts if self.spec_drafts else None


@dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detoks: list[IncrementalDetokenizer | None]
    arrival_time: float
    final_only: bool = False  # output once, when finished (not at every step it advances)

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)


class LLMEngine:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: TextTokenizer | None = None,
        config: EngineConfig | None = None,
        *,
        eos_token_ids: Seq[int] | None = None,
    ) -> None:
        """`tokenizer` turns text prompts into ids and output into text (None: token ids only);
        `eos_token_ids` default to the tokenizer's eos."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = (config or EngineConfig()).resolved(model.config)
        if eos_token_ids is None:
            eos_token_ids = () if tokenizer is None else (tokenizer.eos_id,)
        self.eos_ids = frozenset(eos_token_ids)
        self.runner = ModelRunner(model, self.config, tuple(self.eos_ids))
        overlap = self.config.async_scheduling
        self.overlap = self.runner.device.type == "cuda" if overlap is None else overlap
        if self.runner.compiled:
            start = time.perf_counter()
            self.runner.warm_up()
            log.info("engine: step functions compiled in %.1f s", time.perf_counter() - start)
        self.blocks = BlockManager(
            self.runner.cache.num_blocks, self.config.block_size, self.config.enable_prefix_caching,
            key_next_token=self.config.speculative_tokens > 0,  # the MTP layer's cache depends on it
        )
        self.scheduler = Scheduler(self.config, self.blocks)
        self.requests: dict[str, _Request] = {}
        self.stats = EngineStats()
        self._rng = random.Random(self.config.seed)
        self._inflight: Launched | None = None  # a step launched before its predecessor was read back

    # --- requests ----------------------------------------------------------------------------
    def encode(self, prompt: str | Seq[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("prompt", "text needs a tokenizer; this engine takes token ids")
            return self.tokenizer.encode_prompt(prompt)
        return [int(t) for t in prompt]

    def check(self, prompt_ids: Seq[int], params: SamplingParams) -> None:
        """RequestError unless the engine can serve `params` for this prompt."""
        vocab, max_len = self.model.config.vocab_size, self.config.max_model_len
        if not prompt_ids:
            raise RequestError("prompt", "is empty")
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise RequestError("prompt", f"holds token ids outside the vocabulary [0, {vocab})")
        if len(prompt_ids) >= max_len:
            raise RequestError(
                "prompt", f"{len(prompt_ids)} tokens leave no room to generate within max_model_len {max_len}"
            )
        if params.max_tokens is not None and len(prompt_ids) + params.max_tokens > max_len:
            raise RequestError(
                "max_tokens",
                f"{params.max_tokens} with a prompt of {len(prompt_ids)} tokens exceeds "
                f"max_model_len {max_len}",
            )
        if any(t >= vocab for t in params.stop_token_ids):
            raise RequestError("stop_token_ids", f"ids must be below the vocabulary size {vocab}")
        if any(t >= vocab for t, _ in params.logit_bias):
            raise RequestError("logit_bias", f"token ids must be below the vocabulary size {vocab}")
        if params.stop and self.tokenizer is None:
            raise RequestError("stop", "stop strings need a tokenizer")

    def add_request(
        self,
        request_id: str,
        prompt: str | Seq[int],
        params: SamplingParams | None = None,
        *,
        final_only: bool = False,
    ) -> None:
        """Queue a request (text or token ids); RequestError for one the engine cannot serve.
        `step` returns its output at every step it advances (for streaming), or with `final_only`
        once, when it finishes: a caller that waits for the end saves the engine building a
        snapshot of every output so far at every step."""
        if request_id in self.requests:
            raise RequestError("request_id", f"{request_id!r} is already running")
        params = params or SamplingParams()
        prompt_ids = self.encode(prompt)
        self.check(prompt_ids, params)
        now = time.monotonic()
        seqs = []
        for i in range(params.n):
            seed = self._rng.getrandbits(63) if params.seed is None else params.seed + i
            seqs.append(Sequence(request_id, i, prompt_ids, params, seed, arrival_time=now))
        detoks = [
            None
            if self.tokenizer is None
            else IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)
            for _ in seqs
        ]
        self.requests[request_id] = _Request(request_id, prompt_ids, params, seqs, detoks, now, final_only)
        for seq in seqs:
            self.scheduler.add(seq)
        self.stats.prompt_tokens += len(prompt_ids) * len(seqs)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and release its blocks; its output so far (None if unknown)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.finished:
                self.scheduler.finish(seq)
                seq.finish_reason, seq.finish_time = "abort", time.monotonic()
        return self._output(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    # --- one step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model, apply the results; the outputs of requests that advanced.

        With `async_scheduling` a step's decode rows are launched again, fed the tokens the device
        is still sampling (speculating: and the drafts it is making, from where its acceptances put
        them), before the host reads that step back: the host's work (reading back, stop rules,
        detokenizing, scheduling, preparing inputs) overlaps the GPU's next forward instead of
        adding to it. A row that turns out to have stopped wastes its place in the overlapped step,
        whose output for it is dropped."""
        launched, self._inflight = self._inflight, None
        try:
            if launched is None:
                batch = self.scheduler.schedule()
                self.stats.preemptions += len(batch.preempted)
                if not batch:
                    return []
                launched = self.runner.launch(batch)
            chained = self._continue(launched)
            if chained is not None:
                self._inflight = self.runner.launch(chained, after=launched)
            results = self.runner.collect(launched)
        except BaseException:
            self._inflight = None
            raise
        now = time.monotonic()
        touched: dict[str, _Request] = {}
        generated = 0
        for res in results:
            seq = res.item.seq
            if seq.finished:  # aborted while in flight, or stopped before an overlapped step
                continue
            generated += self._apply(seq, res, now)
            touched[seq.request_id] = self.requests[seq.request_id]
        if self._inflight is not None:
            inflight = self._inflight.batch
            if all(s.seq.finished for s in (*inflight.decode, *inflight.prefill)):
                self._inflight = None  # nothing left to read from it
            else:
                for s in inflight.decode:
                    s.pending = False  # the token it feeds is on the host now
                    if s.draft_pending:  # and where it starts, and the draft it verifies
                        s.start, s.draft, s.draft_pending = s.seq.num_computed, s.seq.draft, False
        self.stats.record_step(now, generated)
        outputs = []
        for req in touched.values():
            finished = req.finished
            if finished or not req.final_only:
                outputs.append(self._output(req))
            if finished:
                del self.requests[req.request_id]
                self.stats.requests_finished += 1
        return outputs

    def _continue(self, launched: Launched) -> Batch | None:
        """The next step's batch, launched before `launched` is read back: each of its rows decodes the
        token it is sampling now (speculating: verifying the draft it is making, from the position
        it reaches whether or not its own draft is accepted; the runner settles that on the device),
        and waiting sequences are admitted as in any step. None (the host reads back first, then
        schedules) when a row is still prefilling, uses penalties (which need its tokens on the
        host) or, speculating, still has min_tokens to go (whether eos may be drawn depends on the
        output index, which the acceptance moves), or when the cache cannot hold what every row
        may reach. A row that may end with what is in flight is left out."""
        if not self.overlap:
            return None
        spec = self.runner.speculative
        items = [*launched.batch.decode, *launched.batch.prefill]
        if not all(s.samples for s in items):
            return None
        # the step in flight adds up to `in_flight` tokens and the next one keeps up to as many; the
        # next one writes up to `reach` positions past the tokens the host knows
        in_flight = 2 if spec else 1
        reach = 2 * in_flight - 1
        rows = []
        for s in items:
            seq, params = s.seq, s.seq.params
            if seq.finished:
                continue
            if params.penalized or (spec and seq.num_output < params.min_tokens):
                return None
            left = self.config.max_model_len - seq.num_tokens
            if params.max_tokens is not None:
                left = min(left, params.max_tokens - seq.num_output)
            if left < 2 * in_flight:
                continue  # it may end before the next step's tokens all count
            rows.append(seq)
        need = sum(self.blocks.blocks_for(seq.num_tokens + reach) - len(seq.block_table) for seq in rows)
        if not rows or need > self.blocks.num_free:
            return None
        for seq in rows:
            self.blocks.grow(seq, seq.num_tokens + reach)
        batch = Batch(
            decode=[Scheduled(seq, seq.num_tokens, 1, pending=True, draft_pending=spec) for seq in rows]
        )
        self.scheduler.admit(batch)
        return batch

    def _apply(self, seq: Sequence, res: RowResult, now: float) -> int:
        """Record a row's result on its sequence; the number of tokens it kept."""
        seq.num_computed += res.computed
        if res.accepted is not None:
            self.stats.spec_drafts += 1
            self.stats.spec_accepted += int(res.accepted)
        seq.draft = res.draft
        if res.prompt is not None:
            self._record_prompt_scores(seq, *res.prompt)
        kept, stopped = 0, False
        for j, token in enumerate(res.tokens):
            seq.token_ids.append(token)
            kept += 1
            if res.logprobs is not None:
                seq.logprobs.append(res.logprobs[j])
                seq.top_logprobs.append(res.top_logprobs[j])
            if seq.first_token_time is None:
                seq.first_token_time = now
            if self._stopped(seq, token):
                stopped = True
                break
        self.blocks.register(seq)  # before a finished sequence releases them: its blocks stay matchable
        if stopped:
            seq.finish_time = now
            self.scheduler.finish(seq)
        return kept

    @staticmethod
    def _record_prompt_scores(
        seq: Sequence, first: int, logprobs: list[float], top: list[list[tuple[int, float]]], ranks: list[int]
    ) -> None:
        """Append the prompt logprobs a row computed from prompt token `first` on, skipping those
        already known (a preempted sequence recomputes its prompt)."""
        skip = len(seq.prompt_logprobs) + 1 - first
        if skip < 0:
            raise RuntimeError(
                f"request {seq.request_id}: prompt logprobs from token {first} arrived before those of "
                f"tokens {len(seq.prompt_logprobs) + 1}..{first - 1}"
            )
        seq.prompt_logprobs += logprobs[skip:]
        seq.prompt_top_logprobs += top[skip:]
        seq.prompt_ranks += ranks[skip:]

    def _stopped(self, seq: Sequence, token: int) -> bool:
        """Append `token`'s text and decide whether `seq` ends here (and why). The text of an eos or
        stop token id that ends the sequence is left out, unless include_stop_str_in_output."""
        params = seq.params
        if not params.ignore_eos and token in self.eos_ids and seq.num_output > params.min_tokens:
            seq.finish_reason = "stop"
        elif token in params.stop_token_ids and seq.num_output > params.min_tokens:
            seq.finish_reason, seq.stop_reason = "stop", token
        detok = self.requests[seq.request_id].detoks[seq.index]
        before = len(seq.output_text)
        if detok is not None and (seq.finish_reason is None or params.include_stop_str_in_output):
            seq.output_text += detok.add([token])
        if seq.finish_reason is None and params.stop and detok is not None and self._stop_string(seq, before):
            return True
        if seq.finish_reason is None and (
            (params.max_tokens is not None and seq.num_output >= params.max_tokens)
            or seq.num_tokens >= self.config.max_model_len
        ):
            seq.finish_reason = "length"
        if seq.finish_reason is None:
            return False
        if detok is not None:  # what was held back for an incomplete character is output after all
            seq.output_text += detok.flush()
        return True

    def _stop_string(self, seq: Sequence, before: int) -> bool:
        """Find a stop string in the text this token completed; cut the text there."""
        params = seq.params
        longest = max(len(s) for s in params.stop)
        start = max(0, before - longest + 1)
        for stop in params.stop:
            at = seq.output_text.find(stop, start)
            if at >= 0:
                end = at + len(stop) if params.include_stop_str_in_output else at
                seq.output_text = seq.output_text[:end]
                seq.finish_reason, seq.stop_reason = "stop", stop
                return True
        return False

    def _output(self, req: _Request) -> RequestOutput:
        outs = []
        for seq in req.seqs:
            text = seq.output_text
            if not seq.finished and seq.params.stop:  # hold back what may be the start of a stop string
                text = text[: max(0, len(text) - max(len(s) for s in seq.params.stop) + 1)]
            outs.append(
                CompletionOutput(
                    seq.index,
                    text,
                    seq.output_ids,
                    seq.finish_reason,
                    seq.stop_reason,
                    list(seq.logprobs) if seq.params.logprobs is not None else None,
                    list(seq.top_logprobs) if seq.params.logprobs is not None else None,
                )
            )
        times = [s.first_token_time for s in req.seqs if s.first_token_time is not None]
        finish = [s.finish_time for s in req.seqs]
        scored = req.seqs[0]  # the completion that computes the prompt's logprobs (`Sequence.scores_prompt`)
        prompt_logprobs = prompt_top = prompt_ranks = None
        if req.params.prompt_logprobs is not None:
            prompt_logprobs = [None, *scored.prompt_logprobs]
            prompt_top = [[], *scored.prompt_top_logprobs]
            prompt_ranks = [None, *scored.prompt_ranks]
        return RequestOutput(
            req.request_id,
            req.prompt_ids,
            outs,
            req.finished,
            max(s.num_cached_tokens for s in req.seqs),
            req.arrival_time,
            min(times) if times else None,
            max(finish) if req.finished and all(f is not None for f in finish) else None,
            prompt_logprobs,
            prompt_top,
            prompt_ranks,
        )

    # --- state for /metrics and tests ----------------------------------------------------------
    @property
    def cache_usage(self) -> float:
        return self.blocks.usage

    @property
    def prefix_hit_rate(self) -> float | None:
        q = self.blocks.prefix_queries
        return self.blocks.prefix_hits / q if q else None
