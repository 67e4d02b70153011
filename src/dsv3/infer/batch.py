"""Offline prompt files: `dsv3 generate --input prompts.jsonl --output out.jsonl` through the engine.

Each input line is a JSON object with one of
    "prompt":   text (fed after the document start, see tokenizer.py) or a list of token ids
    "messages": a chat, [{"role": ..., "content": ...}, ...] (the tokenizer's chat template)
and optionally "id" (any JSON value, copied to the output) and any SamplingParams field
("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "logprobs", ...), which
override the command's defaults for that line. Blank lines are skipped. A line that does not parse
or names an unknown field is an error naming the file, the line and the field; nothing is run.

Each output line answers the input line at the same position (blank lines aside):
    {"id": ..., "outputs": [{"index", "text", "token_ids", "finish_reason", "stop_reason"
     (+ "logprobs", "top_logprobs" when asked)}], "prompt_tokens": N, "cached_prompt_tokens": N
     (+ "prompt_logprobs", "prompt_top_logprobs", "prompt_ranks" with "prompt_logprobs": the first
     token's null)}
The file is written atomically once every prompt has finished.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dsv3.config import ConfigError
from dsv3.infer.llm import LLM
from dsv3.infer.sampling import SamplingParams
from dsv3.io import atomic_open

__all__ = [
    "PromptLine",
    "BatchSummary",
    "read_prompt_file",
    "encode_prompt_lines",
    "run_prompt_lines",
    "run_prompt_file",
]

PROMPT_KEYS = ("prompt", "messages")


@dataclass
class PromptLine:
    line: int
    id: Any
    prompt: str | list[int] | None
    messages: list[dict] | None
    params: SamplingParams
    ids: list[int] | None = None  # the prompt's token ids, once encoded


@dataclass
class BatchSummary:
    prompts: int
    prompt_tokens: int
    generated_tokens: int
    seconds: float


def read_prompt_file(path: str | Path, defaults: dict[str, Any]) -> list[PromptLine]:
    """Every prompt of a JSONL file with its SamplingParams (the line's fields over `defaults`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    lines = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(record).__name__}")
        present = [k for k in PROMPT_KEYS if k in record]
        if len(present) != 1:
            raise ConfigError(f"{where}: needs exactly one of 'prompt' or 'messages'")
        prompt, messages = record.get("prompt"), record.get("messages")
        if prompt is not None and not (
            isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt))
        ):
            raise ConfigError(f"{where}: 'prompt' must be text or a list of token ids")
        if messages is not None and not (
            isinstance(messages, list) and all(isinstance(m, dict) for m in messages)
        ):
            raise ConfigError(f"{where}: 'messages' must be a list of {{'role', 'content'}} objects")
        fields = {k: v for k, v in record.items() if k not in (*PROMPT_KEYS, "id")}
        try:
            params = SamplingParams(**{**defaults, **fields})
        except ValidationError as e:
            first = e.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "line"
            raise ConfigError(f"{where}: {field}: {first['msg']}") from None
        lines.append(PromptLine(number, record.get("id"), prompt, messages, params))
    if not lines:
        raise ConfigError(f"{path}: no prompts")
    return lines


def _output(out, params: SamplingParams) -> list[dict]:
    rows = []
    for c in out.outputs:
        row = {"index": c.index, "text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
               "stop_reason": c.stop_reason}  # fmt: skip
        if params.logprobs is not None:
            row["logprobs"], row["top_logprobs"] = c.logprobs, c.top_logprobs
        rows.append(row)
    return rows


def encode_prompt_lines(llm: LLM, lines: list[PromptLine], path: str | Path) -> None:
    """Fill in each line's token ids, checking that the engine can serve it (errors name the line)."""
    engine = llm.engine
    for p in lines:
        try:
            if p.messages is None:
                p.ids = engine.encode(p.prompt)
            elif engine.tokenizer is None:
                raise ValueError("messages need a tokenizer")
            else:
                p.ids = engine.tokenizer.encode_chat(p.messages)
            engine.check(p.ids, p.params)
        except ValueError as e:
            raise ConfigError(f"{path}:{p.line}: {e}") from None


def run_prompt_lines(
    llm: LLM,
    lines: list[PromptLine],
    output_path: str | Path,
    on_progress: Callable[[int, int], None] | None = None,
) -> BatchSummary:
    """Generate for every (encoded) line in one continuous batch; write `output_path`."""
    start = time.perf_counter()
    outs = llm.generate([p.ids for p in lines], [p.params for p in lines], on_progress=on_progress)
    seconds = time.perf_counter() - start
    with atomic_open(output_path, "w") as f:
        for p, out in zip(lines, outs, strict=True):
            record = {"id": p.id, "outputs": _output(out, p.params),
                      "prompt_tokens": len(out.prompt_token_ids),
                      "cached_prompt_tokens": out.num_cached_tokens}  # fmt: skip
            if p.params.prompt_logprobs is not None:
                record["prompt_logprobs"] = out.prompt_logprobs
                record["prompt_top_logprobs"] = out.prompt_top_logprobs
                record["prompt_ranks"] = out.prompt_ranks
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    generated = sum(len(c.token_ids) for out in outs for c in out.outputs)
    return BatchSummary(len(lines), sum(len(o.prompt_token_ids) for o in outs), generated, seconds)


def run_prompt_file(
    llm: LLM,
    input_path: str | Path,
    output_path: str | Path,
    defaults: dict[str, Any],
    on_progress: Callable[[int, int], None] | None = None,
) -> BatchSummary:
    """Read, check and generate every line of `input_path`; write `output_path`."""
    lines = read_prompt_file(input_path, defaults)
    encode_prompt_lines(llm, lines, input_path)
    return run_prompt_lines(llm, lines, output_path, on_progress)
