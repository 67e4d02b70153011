"""Offline batches through the engine: `LLM(checkpoint).generate(prompts, SamplingParams(...))`.

    llm = LLM("runs/demo")                                   # a checkpoint, or a run's best
    outs = llm.generate(["def parse(", "import os"], SamplingParams(max_tokens=64, temperature=0.8))
    print(outs[0].outputs[0].text)
    llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=32))

Every prompt is queued at once and the engine batches them continuously; the outputs come back in
the order of the prompts. `on_progress(done, total)` is called as requests finish (the CLI draws
a progress bar with it).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from dsv3.checkpoints import Which, checkpoint_tokenizer, resolve_checkpoint
from dsv3.config import ConfigError
from dsv3.infer.engine import EngineConfig, LLMEngine, RequestOutput
from dsv3.infer.sampling import SamplingParams
from dsv3.infer.tokenizer import TextTokenizer
from dsv3.model.hf import load_hf

__all__ = ["LLM", "load_checkpoint"]

log = logging.getLogger(__name__)

Prompt = str | Sequence[int]


def load_checkpoint(
    checkpoint: str | Path,
    *,
    which: Which = "best",
    tokenizer: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> tuple[torch.nn.Module, TextTokenizer, Path]:
    """(model, tokenizer, directory) of a checkpoint or a run's best/last: bf16 on a GPU unless told."""
    directory = resolve_checkpoint(checkpoint, which)
    tok = TextTokenizer.load(tokenizer or checkpoint_tokenizer(directory))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None and device.type == "cuda":
        dtype = torch.bfloat16
    model = load_hf(directory, dtype=dtype, device=device).eval()
    if tok.vocab_size > model.config.vocab_size:
        raise ConfigError(
            f"tokenizer has {tok.vocab_size} tokens, model vocab_size is {model.config.vocab_size}"
        )
    log.info("serving %s", directory)
    return model, tok, directory


class LLM:
    def __init__(
        self,
        checkpoint: str | Path,
        *,
        which: Which = "best",
        tokenizer: str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        config: EngineConfig | None = None,
        **engine_options,
    ) -> None:
        """Load a checkpoint and its tokenizer; `config` or keyword options are EngineConfig fields."""
        model, tok, self.directory = load_checkpoint(
            checkpoint, which=which, tokenizer=tokenizer, device=device, dtype=dtype
        )
        self.engine = LLMEngine(model, tok, _config(config, engine_options))

    @classmethod
    def from_model(
        cls,
        model: torch.nn.Module,
        tokenizer: TextTokenizer | None = None,
        config: EngineConfig | None = None,
        **engine_options,
    ) -> LLM:
        """An LLM over a model already in memory (`tokenizer` None: prompts are token ids)."""
        llm = cls.__new__(cls)
        llm.directory = None
        llm.engine = LLMEngine(model, tokenizer, _config(config, engine_options))
        return llm

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> list[RequestOutput]:
        """One finished RequestOutput per prompt, in order (`params`: one for all, or one each)."""
        if isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        return self._run(list(prompts), params, on_progress)

    def chat(
        self,
        conversations: Sequence[dict] | Sequence[Sequence[dict]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> list[RequestOutput]:
        """Continue each conversation (a list of {"role", "content"} messages) as the assistant."""
        tok = self.engine.tokenizer
        if tok is None:
            raise ValueError("chat needs a tokenizer")
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        return self._run([tok.encode_chat(c) for c in conversations], params, on_progress)

    def _run(self, prompts: list[Prompt], params, on_progress) -> list[RequestOutput]:
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"generate: {len(params)} SamplingParams for {len(prompts)} prompts")
        engine = self.engine
        if engine.has_unfinished_requests():
            raise RuntimeError("generate: the engine is busy with other requests")
        ids = [f"offline-{next(_counter)}" for _ in prompts]
        try:
            for request_id, prompt, p in zip(ids, prompts, params, strict=True):
                engine.add_request(request_id, prompt, p, final_only=True)
            done: dict[str, RequestOutput] = {}
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        if on_progress is not None:
                            on_progress(len(done), len(prompts))
        finally:
            for request_id in ids:  # after an error, nothing stays queued
                engine.abort_request(request_id)
        return [done[i] for i in ids]


_counter = itertools.count()


def _config(config: EngineConfig | None, options: dict) -> EngineConfig:
    if config is not None and options:
        raise ValueError("LLM: pass either config or engine options, not both")
    return config or EngineConfig(**options)
