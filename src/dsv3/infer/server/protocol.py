"""The OpenAI API's request bodies (with vLLM's sampling extras) and the JSON the server answers.

Requests are pydantic models that reject unknown fields, so a misspelt parameter is a 400 naming
it rather than silently ignored. Fields of the OpenAI API that would change the output and that
dsv3 does not implement (tools, suffix, best_of ≠ n, a JSON response_format) are a 400 naming the
field too; fields that only label a request (user, metadata) are accepted.

`echo` with `logprobs` on /v1/completions returns the prompt's tokens with their logprobs before the
completion's (the first token's is null, nothing predicts it): how lm-evaluation-harness's
`local-completions` model scores loglikelihood tasks against a server. With `"max_tokens": 0` as
well (OpenAI's legacy way to score a prompt, which HELM uses) the answer is the prompt alone: the
engine samples one token, which the answer leaves out. vLLM's `prompt_logprobs: k` (both endpoints,
not streamed) answers each prompt token's logprob and rank with the k most likely tokens, per
completion choice (/v1/completions) or beside the choices (/v1/chat/completions), as vLLM does.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dsv3.infer.engine import CompletionOutput, RequestError, RequestOutput
from dsv3.infer.sampling import MAX_LOGPROBS, SamplingParams
from dsv3.infer.tokenizer import TextTokenizer

__all__ = [
    "CompletionRequest",
    "ChatRequest",
    "Unsupported",
    "sampling_params",
    "completion_choice",
    "chat_choice",
    "usage",
    "new_id",
]


class Unsupported(RequestError):
    """An OpenAI field dsv3 does not implement, set to a value that would change the output."""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(BaseModel):
    """What both endpoints share: sampling, stopping, streaming."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[str, float] | None = None  # token id (as a string, JSON's object keys) → bias
    # vLLM's: each prompt token's logprob and rank with this many most likely tokens (not streamed)
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    user: str | None = None
    metadata: dict[str, Any] | None = None

    def _check_streaming(self) -> None:
        if self.stream and self.prompt_logprobs is not None:
            raise RequestError("prompt_logprobs", "is not available when streaming (stream: true)")


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check(self) -> None:
        """RequestError for a field set to something dsv3 does not implement."""
        self._check_streaming()
        if self.suffix:
            raise Unsupported("suffix", "is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise Unsupported("best_of", "must equal n (ranking candidates is not supported)")

    def _each_prompt(self) -> list[str | list[int]]:
        """The request's prompts, one text or token-id list each."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise RequestError("prompt", "is empty")
        return [list(p)] if all(isinstance(x, int) for x in p) else list(p)

    def prompts(self, tokenizer: TextTokenizer) -> list[list[int]]:
        """Token ids of each prompt: text after the document start, ids as they are."""
        return [tokenizer.encode_prompt(x) if isinstance(x, str) else list(x) for x in self._each_prompt()]

    @property
    def prompt_only(self) -> bool:
        """`echo` with `max_tokens` 0: score the prompt, generate nothing."""
        return self.echo and self.max_tokens == 0

    def echoed(self, tokenizer: TextTokenizer) -> list[str]:
        """The text `echo` puts before each prompt's completions: the prompt as sent, token ids decoded."""
        return [x if isinstance(x, str) else tokenizer.decode(x, self.skip_special_tokens)
                for x in self._each_prompt()]  # fmt: skip


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: the template may read them
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise Unsupported("messages", f"content parts of type {part.get('type')!r} are not supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def check(self) -> None:
        """RequestError for a field set to something dsv3 does not implement."""
        self._check_streaming()
        if self.tools:
            raise Unsupported("tools", "tool calling is not supported")
        if self.tool_choice not in (None, "none"):
            raise Unsupported("tool_choice", "tool calling is not supported")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise Unsupported("response_format", "only {'type': 'text'} is supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs", "needs logprobs: true")

    def prompts(self, tokenizer: TextTokenizer) -> list[list[int]]:
        """The chat rendered with the tokenizer's template, as the one prompt."""
        messages = [{**m.model_dump(exclude_none=True), "content": m.text()} for m in self.messages]
        return [tokenizer.encode_chat(messages, self.add_generation_prompt)]


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a completion prompt (with the document start unless add_special_tokens is
    false) or a chat rendered with the template."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    def ids(self, tokenizer: TextTokenizer) -> list[int]:
        if (self.prompt is None) == (self.messages is None):
            raise RequestError("prompt", "give either prompt or messages")
        if self.messages is not None:
            chat = ChatRequest(messages=self.messages, add_generation_prompt=self.add_generation_prompt)
            return chat.prompts(tokenizer)[0]
        return (
            tokenizer.encode_prompt(self.prompt) if self.add_special_tokens else tokenizer.encode(self.prompt)
        )


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]

    def text(self, tokenizer: TextTokenizer, vocab_size: int) -> str:
        bad = [t for t in self.tokens if not 0 <= t < vocab_size]
        if bad:
            raise RequestError("tokens", f"ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
        return tokenizer.decode(self.tokens, skip_special_tokens=False)


def tokenizer_info(tokenizer: TextTokenizer, max_model_len: int) -> dict[str, Any]:
    """vLLM's /tokenizer_info: what a client needs to tokenize as the server does."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokenizer.bos_token if tokenizer.bos_id is not None else None,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "add_bos_token": tokenizer.add_bos,
        "chat_template": tokenizer.chat_template,
        "model_max_length": max_model_len,
        "vocab_size": tokenizer.vocab_size,
    }


_SAMPLING_FIELDS = (
    "n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
    "frequency_penalty", "stop", "stop_token_ids", "ignore_eos", "min_tokens", "seed",
    "skip_special_tokens", "include_stop_str_in_output", "logit_bias",
)  # fmt: skip


def sampling_params(request: CompletionRequest | ChatRequest) -> SamplingParams:
    """The request's SamplingParams; RequestError naming the request field at fault."""
    values = {k: getattr(request, k) for k in _SAMPLING_FIELDS if getattr(request, k) is not None}
    names = {}  # SamplingParams field → the request's name for it
    if isinstance(request, ChatRequest):
        given = request.max_completion_tokens is not None
        values["max_tokens"] = request.max_completion_tokens if given else request.max_tokens
        names["max_tokens"] = "max_completion_tokens" if given else "max_tokens"
        if request.logprobs:
            values["logprobs"] = request.top_logprobs or 0
            names["logprobs"] = "top_logprobs"
    else:
        values["max_tokens"] = 1 if request.prompt_only else request.max_tokens
        values["logprobs"] = request.logprobs
        if request.echo and request.logprobs is not None:
            values["prompt_logprobs"] = request.logprobs
            names["prompt_logprobs"] = "logprobs"
    if request.prompt_logprobs is not None:  # the engine computes the larger top; each answer cuts its own
        values["prompt_logprobs"] = max(request.prompt_logprobs, values.get("prompt_logprobs", 0))
    try:
        return SamplingParams(**values)
    except ValidationError as e:
        first = e.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "body"
        raise RequestError(names.get(field, field), first["msg"]) from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(outputs: list[RequestOutput], generated: bool = True) -> dict[str, int]:
    """Token counts; `generated` False: the completions are left out of the answer (`prompt_only`)."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs) if generated else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _token(tokenizer: TextTokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def completion_logprobs(
    tokenizer: TextTokenizer, out: CompletionOutput, start: int, text_offset: int
) -> dict[str, list] | None:
    """The completions API's logprobs object for tokens [start:] of `out`."""
    if out.logprobs is None:
        return None
    ids = out.token_ids[start : len(out.logprobs)]
    tokens = [_token(tokenizer, t) for t in ids]
    offsets = []
    for t in tokens:
        offsets.append(text_offset)
        text_offset += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": out.logprobs[start:],
        "top_logprobs": [{_token(tokenizer, i): lp for i, lp in top} for top in out.top_logprobs[start:]],
        "text_offset": offsets,
    }


def without_completion(out: CompletionOutput) -> CompletionOutput:
    """`out` with no generated token (`prompt_only`: the one the engine sampled is not answered)."""
    logprobs = None if out.logprobs is None else []
    return dataclasses.replace(out, text="", token_ids=[], logprobs=logprobs, top_logprobs=logprobs)


def echoed_choice(
    tokenizer: TextTokenizer, prefix: str, out: RequestOutput, text: str, logprobs: dict | None, k: int
) -> tuple[str, dict | None]:
    """(text, logprobs) of a completion with `echo`: the prompt's text and, when logprobs were asked
    for, its tokens' logprobs (`out.prompt_logprobs`, the k most likely at each) in front of the
    completion's."""
    if logprobs is None or out.prompt_logprobs is None:
        return prefix + text, logprobs
    tokens = [_token(tokenizer, t) for t in out.prompt_token_ids]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return prefix + text, {
        "tokens": tokens + logprobs["tokens"],
        "token_logprobs": out.prompt_logprobs + logprobs["token_logprobs"],
        "top_logprobs": [None]
        + [{_token(tokenizer, i): lp for i, lp in top[:k]} for top in out.prompt_top_logprobs[1:]]
        + logprobs["top_logprobs"],
        # as vLLM: offsets add up the tokens' texts, prompt then completion (special tokens count too)
        "text_offset": offsets + [at + o for o in logprobs["text_offset"]],
    }


def vllm_prompt_logprobs(tokenizer: TextTokenizer, out: RequestOutput, k: int) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: None for the first prompt token (nothing predicts it), then per token
    {token id: {"logprob", "rank", "decoded_token"}} for the token itself (its rank in the vocabulary)
    and the k most likely (ranks 1..k); -inf is sent as -9999.0, as vLLM clamps it (JSON has no inf)."""

    def entry(token_id: int, logprob: float, rank: int) -> dict:
        return {"logprob": max(logprob, -9999.0), "rank": rank, "decoded_token": _token(tokenizer, token_id)}

    rows: list[dict | None] = [None]
    scored = zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:], out.prompt_ranks[1:],
                 out.prompt_top_logprobs[1:], strict=True)  # fmt: skip
    for token, logprob, rank, top in scored:
        row = {str(token): entry(token, logprob, rank)}
        for j, (i, v) in enumerate(top[:k]):
            row.setdefault(str(i), entry(i, v, j + 1))
        rows.append(row)
    return rows


def chat_logprobs(tokenizer: TextTokenizer, out: CompletionOutput, start: int) -> dict[str, list] | None:
    """The chat API's logprobs object for tokens [start:] of `out`."""
    if out.logprobs is None:
        return None

    def entry(token_id: int, logprob: float) -> dict:
        text = _token(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = []
    for token_id, lp, top in zip(
        out.token_ids[start:], out.logprobs[start:], out.top_logprobs[start:], strict=False
    ):
        content.append({**entry(token_id, lp), "top_logprobs": [entry(i, v) for i, v in top]})
    return {"content": content}


def completion_choice(index: int, text: str, out: CompletionOutput, logprobs: dict | None) -> dict:
    return {
        "index": index,
        "text": text,
        "logprobs": logprobs,
        "finish_reason": out.finish_reason,
        "stop_reason": out.stop_reason,
    }


def chat_choice(index: int, out: CompletionOutput, logprobs: dict | None) -> dict:
    return {
        "index": index,
        "message": {"role": "assistant", "content": out.text},
        "logprobs": logprobs,
        "finish_reason": out.finish_reason,
        "stop_reason": out.stop_reason,
    }


def created() -> int:
    return int(time.time())
