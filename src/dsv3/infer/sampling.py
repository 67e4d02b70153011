"""Sampling parameters of a request, and the batched sampler the engine runs on each step's logits.

`SamplingParams` holds what vLLM and the OpenAI API call them (temperature, top_p, top_k, min_p,
repetition/presence/frequency penalties, logit_bias, stop strings and token ids, n, seed, logprobs,
prompt_logprobs, max_tokens). The sampler applies them to a batch of rows, each with its own values,
in vLLM's order: logit_bias added to the raw logits → penalties → temperature → min_p → top_k →
top_p → one draw (greedy rows: the argmax after the bias and penalties).

Reproducibility: a row's draw is the inverse CDF at one uniform number that depends only on the
request's seed, the index of the token in its output and a stream number (`uniform`), so a seeded
request samples the same tokens whatever else shares its batch, and whether or not the engine had
to preempt and recompute it. Logprobs are the model's own (log-softmax of the raw logits), as
vLLM reports them by default.

Speculative decoding (`draft` per row): the row draws its token from p exactly as without a draft
(the same uniform number), and the draft is accepted when it is that token. The draft was the draft
model's argmax, a distribution q with all its mass on it, for which the standard rule (accept with
probability min(1, p/q) = p(draft), else draw from p without the draft) accepts at the same rate
p(draft) and also outputs p; coupling the acceptance to the row's own draw keeps that rate and that
distribution and makes a seeded request's tokens independent of its drafts: the same with and
without speculation, and whatever drafts a preemption or another batch led to. Greedy rows accept
exactly when the draft is the argmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dsv3.host_copy import HostCopy

__all__ = [
    "SamplingParams",
    "SamplingRow",
    "SampleOutput",
    "MAX_LOGPROBS",
    "uniform",
    "sample",
    "sample_async",
    "token_logprobs",
    "top_pairs",
    "PendingSample",
    "device_index",
    "to_device",
    "params_error",
]

MAX_LOGPROBS = 20  # top logprobs a row may ask for (OpenAI's limit)
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


class SamplingParams(BaseModel):
    """How to pick the tokens of one request (vLLM's names and defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n: int = Field(default=1, ge=1, le=128, description="completions to return for the prompt")
    max_tokens: int | None = Field(default=16, ge=1, description="None: up to the model's context")
    min_tokens: int = Field(default=0, ge=0, description="tokens before eos or a stop token id may end it")
    temperature: float = Field(default=1.0, ge=0.0, le=100.0, description="0 = greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1, description="0 or -1: all tokens")
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=100.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    seed: int | None = Field(default=None, ge=-(1 << 63), lt=1 << 64)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS, description="top logprobs per token")
    prompt_logprobs: int | None = Field(
        default=None, ge=0, le=MAX_LOGPROBS, description="logprobs of the prompt's tokens, and this many top"
    )
    skip_special_tokens: bool = True
    # added to a token's logit before anything else (OpenAI's ±100 range); a dict {token id: bias} in
    # (JSON object keys may be strings of ids), held as sorted (id, bias) pairs so params stay hashable
    logit_bias: tuple[tuple[int, float], ...] = ()

    @field_validator("stop", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        if v is None:
            return ()
        return (v,) if isinstance(v, str) else v

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if any(s == "" for s in v):
            raise ValueError("stop strings must not be empty")
        return v

    @field_validator("stop_token_ids", mode="before")
    @classmethod
    def _none_is_empty(cls, v):
        return () if v is None else v

    @field_validator("stop_token_ids")
    @classmethod
    def _token_ids(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(t < 0 for t in v):
            raise ValueError("token ids must be ≥ 0")
        return v

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _bias_pairs(cls, v):
        if v is None:
            return ()
        if isinstance(v, dict):
            try:
                return tuple(sorted((int(k), v[k]) for k in v))
            except (TypeError, ValueError):
                raise ValueError("keys must be token ids (integers)") from None
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, v: tuple[tuple[int, float], ...]) -> tuple[tuple[int, float], ...]:
        for token, bias in v:
            if token < 0:
                raise ValueError(f"token id {token} must be ≥ 0")
            if not -100.0 <= bias <= 100.0:  # also refuses NaN
                raise ValueError(f"bias {bias} of token {token} must be within [-100, 100]")
        if len({t for t, _ in v}) != len(v):
            raise ValueError("a token id appears twice")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> SamplingParams:
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens {self.min_tokens} exceeds max_tokens {self.max_tokens}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


def params_error(err: ValidationError) -> tuple[str, str]:
    """(field, one-line message) of the first problem in a ValidationError of SamplingParams or a request."""
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "body"
    return field, f"{field}: {first['msg']}"


# --------------------------------------------------------------------------------------------
# Per-row randomness
# --------------------------------------------------------------------------------------------


def _splitmix64(x: int) -> int:
    x = (x + _GOLDEN) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def uniform(seed: int, index: int, stream: int = 0) -> float:
    """A number in [0, 1) that depends only on (seed, index, stream): the draw for output token
    `index` of a request (stream 0: the token; other streams are for any further draw a row needs)."""
    x = _splitmix64((seed & _MASK64) ^ _splitmix64(index * 4 + stream))
    return (x >> 11) * 2.0**-53


# --------------------------------------------------------------------------------------------
# The batched sampler
# --------------------------------------------------------------------------------------------


@dataclass
class SamplingRow:
    """One row of logits to sample: its parameters and the state the parameters need."""

    params: SamplingParams
    seed: int
    index: int  # the output token this row produces (0 = the first)
    prompt: Sequence[int]  # prompt token ids (the repetition penalty sees them)
    output: Sequence[int]  # tokens generated so far, before this row's
    banned: Sequence[int] = ()  # may not be drawn now (eos and stop ids before min_tokens)
    draft: int | None = None  # a speculative draft for this position, accepted or replaced here


@dataclass
class SampleOutput:
    """Per row: the token, whether the row's draft was accepted, and logprobs when asked."""

    tokens: list[int]
    accepted: list[bool]
    logprobs: list[float] | None  # of the chosen token, under the model's distribution
    top_logprobs: list[list[tuple[int, float]]] | None  # the row's `params.logprobs` best


def to_device(values: Sequence, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host values on `device` without waiting for the device: `torch.tensor(..., device=cuda)`
    would synchronize the stream, which the engine's overlapped steps must never do."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def device_index(positions: Sequence[int], device: torch.device) -> slice | torch.Tensor:
    """An index selecting these positions (ascending or not): a slice where they step evenly, which
    costs no copy to the device (the common case: every row, or every other pick), else an index
    tensor. Read through it with `t[index]` (a view for a slice) and write with `t[index] = v`."""
    n = len(positions)
    first = positions[0] if n else 0
    step = positions[1] - first if n > 1 else 1
    if step > 0 and first >= 0 and all(p == first + k * step for k, p in enumerate(positions)):
        return slice(first, first + step * (n - 1) + 1, step)
    return to_device(positions, device, torch.long)


def _bias(raw: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """The raw logits plus each row's logit_bias (a new tensor), or `raw` itself when no row has one."""
    entries = [(i, t, b) for i, r in enumerate(rows) for t, b in r.params.logit_bias]
    if not entries:
        return raw
    rows_i, tokens, biases = zip(*entries, strict=True)
    device = raw.device
    index = (to_device(rows_i, device, torch.long), to_device(tokens, device, torch.long))
    return raw.index_put(index, to_device(biases, device, raw.dtype), accumulate=True)


def _penalize(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Repetition (prompt and output), presence and frequency (output) penalties, in place, where asked."""
    which = [i for i, r in enumerate(rows) if r.params.penalized]
    if not which:
        return logits
    device = logits.device
    idx = to_device(which, device)
    sub = logits[idx]
    counts = torch.zeros_like(sub)
    seen = torch.zeros_like(sub, dtype=torch.bool)
    for j, i in enumerate(which):
        out = to_device(list(rows[i].output), device, torch.long)
        counts[j].index_add_(0, out, torch.ones_like(out, dtype=sub.dtype))
        seen[j, to_device(list(rows[i].prompt), device, torch.long)] = True
    seen |= counts > 0

    def column(name: str) -> torch.Tensor:
        return to_device([getattr(rows[i].params, name) for i in which], device).unsqueeze(1)

    rep = column("repetition_penalty")
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - column("frequency_penalty") * counts - column("presence_penalty") * (counts > 0)
    logits[idx] = sub
    return logits


def _filter(probs: torch.Tensor, rows: Sequence[SamplingRow]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """min_p, top_k and top_p: probs (N, V) with the excluded tokens zeroed, possibly sorted
    (descending) with the order that maps sorted columns back to token ids."""
    device, vocab = probs.device, probs.shape[1]
    if any(r.params.min_p > 0 for r in rows):
        min_p = to_device([r.params.min_p for r in rows], device)
        probs = probs.masked_fill(probs < min_p.unsqueeze(1) * probs.amax(-1, keepdim=True), 0.0)
    top_k = [r.params.top_k if r.params.top_k > 0 else vocab for r in rows]
    if min(top_k) >= vocab and all(r.params.top_p >= 1 for r in rows):
        return probs, None
    probs, order = probs.sort(-1, descending=True)
    rank = torch.arange(vocab, device=device)
    probs = probs.masked_fill(rank >= to_device(top_k, device).unsqueeze(1), 0.0)
    mass = probs.cumsum(-1)
    before = (mass - probs) / mass[:, -1:]  # the kept mass ranked above each token, normalized
    top_p = to_device([r.params.top_p for r in rows], device)
    return probs.masked_fill(before >= top_p.unsqueeze(1), 0.0), order


def _draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse CDF: per row the first column whose cumulative mass exceeds u·total (N,)."""
    cdf = probs.cumsum(-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1).to(cdf.dtype), right=True)
    return idx.squeeze(1).clamp(max=probs.shape[1] - 1)


@dataclass
class PendingSample:
    """A sampler call's results still on the device: `result()` reads them back (and waits for them).

    `tokens` (N,) may feed the next step's forward on the device before the host has read them."""

    tokens: torch.Tensor
    accepted: torch.Tensor
    logprobs: torch.Tensor | None  # (N,) of the chosen tokens
    top: tuple[torch.Tensor, torch.Tensor] | None  # (values, ids), (N, the most asked) each
    top_counts: list[int]  # per row, how many top logprobs it asked for
    _host: HostCopy = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # copied behind the sampler: reading them waits for this step, not for one queued after it
        tensors = {"tokens": self.tokens, "accepted": self.accepted}
        if self.logprobs is not None:
            tensors["logprobs"] = self.logprobs
        if self.top is not None:
            tensors["top_values"], tensors["top_ids"] = self.top
        self._host = HostCopy(tensors)

    def result(self) -> SampleOutput:
        host = {name: t.tolist() for name, t in self._host.get().items()}
        tokens, logprobs, top = host["tokens"], host.get("logprobs"), None
        if logprobs is not None:
            top = [[] for _ in tokens]
            if self.top is not None:
                top = top_pairs(host["top_ids"], host["top_values"], self.top_counts)
        return SampleOutput(tokens, host["accepted"], logprobs, top)


@torch.no_grad()
def sample(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SampleOutput:
    """Tokens for logits (N, V), one row per `rows` entry (see the module docstring)."""
    return sample_async(logits, rows).result()


@torch.no_grad()
def sample_async(
    logits: torch.Tensor,
    rows: Sequence[SamplingRow],
    drafts: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
) -> PendingSample:
    """`sample`, enqueued on the device without waiting for it: host values reach the device by
    non-blocking copies and every decision that depends on them is taken on the host.

    An overlapped speculative step's rows verify drafts the host does not know yet and sit at an
    output index it does not know either: `drafts` (N,) on the device, −1 for none, replaces the
    rows' drafts, and where `shift` (N,) is 1 a row's draw is that of output token `index + 1`."""
    if logits.shape[0] != len(rows):
        raise ValueError(f"sample: {logits.shape[0]} rows of logits for {len(rows)} sampling rows")
    device = logits.device
    raw = logits.float()
    want = max((r.params.logprobs for r in rows if r.params.logprobs is not None), default=None)
    logits = _bias(raw, rows)
    if logits is raw and any(r.params.penalized for r in rows):
        logits = raw.clone()
    logits = _penalize(logits, rows)
    banned = [(i, t) for i, r in enumerate(rows) for t in r.banned]
    if banned:
        logits = logits.clone() if logits is raw else logits
        rows_i, toks = zip(*banned, strict=True)
        logits[to_device(rows_i, device, torch.long), to_device(toks, device, torch.long)] = float("-inf")
    tokens = logits.argmax(-1)
    if drafts is None and all(r.draft is None for r in rows):  # no draft: nothing to copy or compare
        drafts = torch.full_like(tokens, -1)
        accepted = torch.zeros_like(tokens, dtype=torch.bool)
    else:
        if drafts is None:
            drafts = to_device([-1 if r.draft is None else r.draft for r in rows], device, torch.long)
        accepted = (drafts >= 0) & (tokens == drafts)

    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if sampled:
        idx = to_device(sampled, device, torch.long)
        sub = [rows[i] for i in sampled]
        temp = to_device([r.params.temperature for r in sub], device).unsqueeze(1)
        probs = (logits[idx] / temp).softmax(-1)
        probs, order = _filter(probs, sub)
        probs = probs / probs.sum(-1, keepdim=True)
        u = to_device([uniform(r.seed, r.index, 0) for r in sub], device, torch.float64)
        if shift is not None:
            later = to_device([uniform(r.seed, r.index + 1, 0) for r in sub], device, torch.float64)
            u = torch.where(shift[idx].bool(), later, u)
        drawn = _draw(probs, u)
        if order is not None:
            drawn = order.gather(1, drawn.unsqueeze(1)).squeeze(1)
        sub_drafts = drafts[idx]
        tokens[idx] = drawn  # the draw without a draft; the draft is kept when it is this token
        accepted[idx] = (sub_drafts >= 0) & (drawn == sub_drafts)

    logprobs = top = None
    counts = [r.params.logprobs or 0 for r in rows]
    if want is not None:
        logprobs, top = token_logprobs(raw, tokens, want)
    return PendingSample(tokens, accepted, logprobs, top, counts)


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, k: int
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """The model's own logprobs (log-softmax of the raw float32 logits (N, V)) of `tokens` (N,), and
    the k largest as (values, ids), each (N, k) (None for k = 0)."""
    lp = logits.log_softmax(-1)
    chosen = lp.gather(1, tokens.unsqueeze(1)).squeeze(1)
    if not k:
        return chosen, None
    top = lp.topk(k, dim=-1)
    return chosen, (top.values, top.indices)


def top_pairs(
    ids: list[list[int]], values: list[list[float]], counts: Sequence[int]
) -> list[list[tuple[int, float]]]:
    """Host rows of top-k ids and values as each row's first counts[i] (id, logprob) pairs."""
    return [list(zip(i[:k], v[:k], strict=True)) for i, v, k in zip(ids, values, counts, strict=True)]
