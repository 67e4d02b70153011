"""A checkpoint's tokenizer for serving: encode prompts, render chats, decode output incrementally.

`TextTokenizer.load(path)` reads tokenizer.json and, beside it, tokenizer_config.json (special
tokens, `add_bos_token`, `chat_template`) the way transformers does, without needing transformers.

A text prompt starts where a document starts: after BOS when the tokenizer config adds one
(DeepSeek-V3's tokenizer), else after EOS, which is how dsv3's token shards separate documents.
A chat is rendered with the config's `chat_template` (Jinja, sandboxed, with the options
transformers uses), or DeepSeek-V3's turn format when the checkpoint has none; the rendered text
carries its own special tokens.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from dsv3.config import ConfigError
from dsv3.data.tokenizer import BOS, CHAT_TEMPLATE, EOS, load_tokenizer

__all__ = ["TextTokenizer", "IncrementalDetokenizer"]

CONFIG_FILE = "tokenizer_config.json"


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer, config: dict | None = None) -> None:
        self.tokenizer, self.config = tokenizer, dict(config or {})
        self.bos_token = _token_text(self.config.get("bos_token")) or BOS
        self.eos_token = _token_text(self.config.get("eos_token")) or EOS
        self.pad_token = _token_text(self.config.get("pad_token"))
        self.bos_id = tokenizer.token_to_id(self.bos_token)
        self.eos_id = tokenizer.token_to_id(self.eos_token)
        if self.eos_id is None:
            raise ConfigError(f"tokenizer has no eos token {self.eos_token!r}")
        self.add_bos = bool(self.config.get("add_bos_token", False)) and self.bos_id is not None
        template = self.config.get("chat_template")
        if isinstance(template, list):  # transformers' named templates: [{"name": ..., "template": ...}]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template: str = template or CHAT_TEMPLATE

    @classmethod
    def load(cls, path: str | Path) -> TextTokenizer:
        """From a tokenizer.json or a directory holding one (and maybe tokenizer_config.json)."""
        path = Path(path)
        config_file = (path if path.is_dir() else path.parent) / CONFIG_FILE
        config = {}
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{config_file}: not valid JSON ({e.msg}, line {e.lineno})") from None
        return cls(load_tokenizer(path), config)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` as it is (special tokens spelled in it become their ids)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """A completion prompt: the document start (BOS or EOS, see the module docstring), then the text."""
        return [self.bos_id if self.add_bos else self.eos_id, *self.encode(text)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @cached_property
    def _template(self):
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        try:
            return env.from_string(self.chat_template)
        except TemplateError as e:
            raise ConfigError(f"chat_template: {e}") from None

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The chat as the model was trained to see it, ending with the assistant's turn marker."""
        from jinja2 import TemplateError

        try:
            return self._template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateError as e:
            raise ValueError(f"messages: the chat template rejected them: {e}") from None

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt))


class IncrementalDetokenizer:
    """Text of a growing list of token ids, emitted as it becomes final.

    Byte-level tokens can split a character: the text of the newest tokens is held back while it
    ends in U+FFFD (an incomplete UTF-8 sequence), and each step decodes only a short window of
    tokens instead of the whole output (the scheme of text-generation-inference and vLLM).
    """

    def __init__(self, tokenizer: TextTokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = self.read_offset = 0

    def add(self, ids: Sequence[int]) -> str:
        """Append `ids`; the text they complete (possibly empty)."""
        self.ids.extend(ids)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], self.skip)
        full = decode(self.ids[self.prefix_offset :], self.skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        """The text still held back, incomplete characters as U+FFFD (the output has ended)."""
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], self.skip)
        full = decode(self.ids[self.prefix_offset :], self.skip)
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :]
