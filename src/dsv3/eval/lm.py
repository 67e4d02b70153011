"""The model interface every scorer uses, and its one implementation over any causal LM.

    lm.loglikelihood([LoglikelihoodRequest("Question: 2+2?\\nAnswer:", " 4")])   # [Loglikelihood(-0.3, True)]
    lm.loglikelihood_rolling(["a whole document"])                              # [-123.4]
    lm.generate([GenerationRequest("Q: ...\\nA:", 256, stop=("\\n\\n",))])       # ["The answer is 4."]

`LanguageModel` is the protocol (`dsv3 eval` and the lm-evaluation-harness adapter both call it);
`CausalLM` implements it given three small functions that a backend supplies (backends.py):
`forward(ids, mask) → logits at the masked positions`, `generate_tokens(prompts, ...) → new tokens`
and a `Codec` (text ↔ token ids, plus the prefix token every text follows).

Log-likelihoods: (context, continuation) is tokenized as lm-eval does (trailing spaces of the
context move to the continuation; the continuation's tokens are those of context + continuation
past the context's). Requests are sorted by length and packed into right-padded batches of at most
`batch_tokens` tokens; a causal model never attends to the padding on the right, so no mask is
needed. Requests with the same input tokens (MMLU's four single-letter answers) share one row.
Log-softmax is taken in float32, only at the scored positions. A context too long for the model
loses tokens from its left.

Generation: prompts are batched by length, left-truncated to leave room for max_new_tokens, and
generated in rounds of growing length (32 tokens, then 64, ...) so that rows stop soon after their
first stop string or EOS; stop strings are applied to the decoded text.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = [
    "LoglikelihoodRequest",
    "Loglikelihood",
    "GenerationRequest",
    "LanguageModel",
    "Codec",
    "CausalLM",
    "cut_at_stop",
    "rolling_windows",
]

log = logging.getLogger(__name__)

Progress = Callable[[int], None] | None


@dataclass(frozen=True)
class LoglikelihoodRequest:
    context: str
    continuation: str


@dataclass(frozen=True)
class Loglikelihood:
    logprob: float  # log p(continuation | context), summed over its tokens (natural log)
    is_greedy: bool  # whether greedy decoding would have produced exactly these tokens


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0


class LanguageModel(Protocol):
    name: str
    max_length: int

    def loglikelihood(
        self, requests: Sequence[LoglikelihoodRequest], progress: Progress = None
    ) -> list[Loglikelihood]: ...

    def loglikelihood_rolling(self, texts: Sequence[str], progress: Progress = None) -> list[float]: ...

    def generate(
        self, requests: Sequence[GenerationRequest], seed: int = 0, progress: Progress = None
    ) -> list[str]: ...


class Codec(Protocol):
    """Text ↔ token ids. `prefix`: the tokens every scored or generated text follows (a BOS or the
    EOS that separated training documents); `eos_id` ends a generation."""

    prefix: list[int]
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: list[int]) -> str: ...


Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # ids (B, T), mask (B, T) → logits (N, V)
GenerateTokens = Callable[[list[list[int]], int, float, float, torch.Generator], list[list[int]]]


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the earliest stop string."""
    cut = min((i for s in stop if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def rolling_windows(
    tokens: list[int], prefix: list[int], max_length: int
) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) token windows that score every token once with the most context
    (lm-eval's loglikelihood_rolling): windows of up to max_length predictions, each after the
    tokens before it, the first after `prefix`."""
    full = prefix + tokens
    p, windows = len(prefix), []
    for start in range(0, len(tokens), max_length):
        end = min(start + max_length, len(tokens))
        first = max(0, end + p - 1 - max_length)  # the model input, full[first : end + p - 1], fits
        windows.append((full[first : start + p], full[start + p : end + p]))
    return windows


@dataclass
class _Row:
    """One forward row: input ids, and the requests scored on it (index, first target position, targets)."""

    ids: list[int]
    scored: list[tuple[int, int, list[int]]]


class CausalLM:
    """`LanguageModel` over a backend's forward, generate and codec functions (see the module docs)."""

    def __init__(
        self,
        name: str,
        forward: Forward,
        generate_tokens: GenerateTokens,
        codec: Codec,
        max_length: int,
        device: torch.device | str = "cpu",
        batch_tokens: int = 16384,
        batch_size: int = 64,
        first_round: int = 32,
    ) -> None:
        if max_length < 2 or batch_tokens < max_length or batch_size < 1:
            raise ValueError(
                f"max_length {max_length}, batch_tokens {batch_tokens}, batch_size {batch_size}: "
                "need max_length ≥ 2, batch_tokens ≥ max_length, batch_size ≥ 1"
            )
        self.name, self.forward, self.generate_tokens, self.codec = name, forward, generate_tokens, codec
        self.max_length, self.device = max_length, torch.device(device)
        self.batch_tokens, self.batch_size, self.first_round = batch_tokens, batch_size, first_round

    # --- log-likelihoods ---------------------------------------------------------------------

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        return self.encode_pairs([(context, continuation)])[0]

    def encode_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        """(context, continuation) texts → (prefix + context ids, continuation ids), lm-eval's way:
        the continuation's ids are those of context + continuation after the context's, and spaces
        ending the context move to the continuation. Each distinct text is encoded once, in batches
        (a multiple-choice question's context serves all its choices; MMLU's 56k requests have 14k)."""
        split = []
        for context, continuation in pairs:
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            split.append((context, context + continuation))
        texts = list(dict.fromkeys(t for pair in split for t in pair if t))
        ids = dict(zip(texts, self.codec.encode_batch(texts), strict=True)) if texts else {}
        ids[""] = []
        out = []
        for context, whole in split:
            context_ids = ids[context]
            out.append((self.codec.prefix + context_ids, ids[whole][len(context_ids) :]))
        return out

    def loglikelihood(
        self, requests: Sequence[LoglikelihoodRequest], progress: Progress = None
    ) -> list[Loglikelihood]:
        pairs = self.encode_pairs([(r.context, r.continuation) for r in requests])
        return self.score_tokens(pairs, progress)

    def loglikelihood_rolling(self, texts: Sequence[str], progress: Progress = None) -> list[float]:
        owners, pairs = [], []
        for i, text in enumerate(texts):
            windows = rolling_windows(self.codec.encode(text), self.codec.prefix, self.max_length)
            owners += [i] * len(windows)
            pairs += windows
        totals = [0.0] * len(texts)
        for owner, scored in zip(owners, self.score_tokens(pairs), strict=True):
            totals[owner] += scored.logprob
        if progress:
            progress(len(texts))
        return totals

    def _rows(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[_Row]:
        rows: dict[tuple[int, ...], _Row] = {}
        truncated = 0
        for i, (context, continuation) in enumerate(pairs):
            if not continuation:
                raise ValueError(f"request {i}: the continuation has no tokens")
            if len(continuation) > self.max_length:
                raise ValueError(
                    f"request {i}: a {len(continuation)}-token continuation does not fit the "
                    f"model's {self.max_length} positions"
                )
            keep = self.max_length + 1 - len(continuation)
            if len(context) > keep:
                context, truncated = context[-keep:], truncated + 1
            if not context:
                raise ValueError(f"request {i}: no context token to condition on (empty prefix)")
            ids = (context + continuation)[:-1]
            row = rows.setdefault(tuple(ids), _Row(ids, []))
            row.scored.append((i, len(context) - 1, continuation))
        if truncated:
            log.warning(
                "%d of %d contexts were cut on the left to fit %d positions",
                truncated,
                len(pairs),
                self.max_length,
            )
        return sorted(rows.values(), key=lambda r: -len(r.ids))

    def _batches(self, rows: list[_Row]) -> list[list[_Row]]:
        batches: list[list[_Row]] = []
        for row in rows:  # longest first: a batch's first row sets its width
            if (
                batches
                and len(batches[-1]) < self.batch_size
                and (len(batches[-1]) + 1) * len(batches[-1][0].ids) <= self.batch_tokens
            ):
                batches[-1].append(row)
            else:
                batches.append([row])
        return batches

    @torch.inference_mode()
    def score_tokens(
        self, pairs: Sequence[tuple[list[int], list[int]]], progress: Progress = None
    ) -> list[Loglikelihood]:
        """log p(continuation | context) for token-id pairs (the context includes any prefix)."""
        results: list[Loglikelihood | None] = [None] * len(pairs)
        for batch in self._batches(self._rows(pairs)):
            B, T = len(batch), len(batch[0].ids)
            ids = torch.zeros(B, T, dtype=torch.long)
            mask = torch.zeros(B, T, dtype=torch.bool)
            for b, row in enumerate(batch):
                ids[b, : len(row.ids)] = torch.tensor(row.ids)
                for _, start, continuation in row.scored:
                    mask[b, start : start + len(continuation)] = True
            logprobs = self.forward(ids.to(self.device), mask.to(self.device)).float().log_softmax(-1)
            where = torch.full((B, T), -1, dtype=torch.long)  # (b, t) → its row in logprobs (N, V)
            where[mask] = torch.arange(logprobs.shape[0])
            # Requests sharing a row may score different targets at the same positions, so each
            # request gathers its own targets: flat lists over every scored token of the batch.
            requests = [i for row in batch for i, _, _ in row.scored]
            owner, at, target, k = [], [], [], 0
            for b, row in enumerate(batch):
                for _, start, continuation in row.scored:
                    n = len(continuation)
                    owner += [k] * n
                    at += where[b, start : start + n].tolist()
                    target += continuation
                    k += 1
            owner_t, at_t, target_t = (torch.tensor(x, device=logprobs.device) for x in (owner, at, target))
            picked = logprobs[at_t, target_t].double()  # (M,) log p of each scored token
            hit = (logprobs.argmax(-1)[at_t] == target_t).long()
            sums = torch.zeros(k, dtype=torch.float64, device=logprobs.device).index_add_(0, owner_t, picked)
            misses = torch.zeros(k, dtype=torch.long, device=logprobs.device).index_add_(0, owner_t, 1 - hit)
            sums, misses = sums.cpu(), misses.cpu()
            for j, i in enumerate(requests):
                results[i] = Loglikelihood(float(sums[j]), bool(misses[j] == 0))
            if progress:
                progress(len(requests))
        return results  # type: ignore[return-value]

    # --- generation --------------------------------------------------------------------------

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        room = self.max_length - request.max_new_tokens
        if room < 1:
            raise ValueError(
                f"max_new_tokens {request.max_new_tokens} leaves no room for a prompt in the "
                f"model's {self.max_length} positions"
            )
        ids = self.codec.prefix + self.codec.encode(request.prompt)
        return ids[-room:]

    def _generate_batch(
        self,
        prompts: list[list[int]],
        stops: list[tuple[str, ...]],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        generator: torch.Generator,
    ) -> list[str]:
        """Generate in rounds of growing length (first_round, twice that, ...), each continuing the rows
        that have emitted neither EOS nor a stop string: a completion that stops early does not pay
        for max_new_tokens decode steps, and a row is prefilled O(log max_new_tokens) times."""
        out: list[list[int]] = [[] for _ in prompts]
        active = list(range(len(prompts)))
        size = self.first_round if any(stops) else max_new_tokens
        while active:
            n = min(size, max_new_tokens - len(out[active[0]]))  # active rows have generated alike
            rows = [(prompts[i] + out[i])[-(self.max_length - n) :] for i in active]
            new = self.generate_tokens(rows, n, temperature, top_p, generator)
            for i, tokens in zip(list(active), new, strict=True):
                out[i] += tokens
                text = self.codec.decode(out[i])
                # fewer tokens than asked: the row emitted EOS
                if len(tokens) < n or len(out[i]) >= max_new_tokens or cut_at_stop(text, stops[i]) != text:
                    active.remove(i)
            size *= 2
        return [cut_at_stop(self.codec.decode(tokens), stop) for tokens, stop in zip(out, stops, strict=True)]

    def generate(
        self, requests: Sequence[GenerationRequest], seed: int = 0, progress: Progress = None
    ) -> list[str]:
        """Completions, in order; requests with the same settings are batched, longest prompts first."""
        prompts = [self._prompt_ids(r) for r in requests]
        groups: dict[tuple[int, float, float], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.max_new_tokens, r.temperature, r.top_p), []).append(i)
        generator = torch.Generator(self.device).manual_seed(seed)
        out: list[str | None] = [None] * len(requests)
        for (max_new_tokens, temperature, top_p), members in groups.items():
            members.sort(key=lambda i: -len(prompts[i]))
            for first in range(0, len(members), self.batch_size):
                batch = members[first : first + self.batch_size]
                texts = self._generate_batch(
                    [prompts[i] for i in batch],
                    [requests[i].stop for i in batch],
                    max_new_tokens,
                    temperature,
                    top_p,
                    generator,
                )
                for i, text in zip(batch, texts, strict=True):
                    out[i] = text
                if progress:
                    progress(len(batch))
        return out  # type: ignore[return-value]
