"""Byte-level BPE tokenizer training (Hugging Face `tokenizers`) with DeepSeek-V3's special tokens.

The output directory loads with `transformers.PreTrainedTokenizerFast.from_pretrained(dir)` (or
`AutoTokenizer`), which then knows BOS/EOS/pad and the chat markers, and with
`tokenizers.Tokenizer.from_file(dir / "tokenizer.json")`:

    tokenizer.json            the tokenizer (byte-level BPE: any text encodes, nothing is <unk>)
    tokenizer_config.json     special tokens, chat template, class for transformers
    special_tokens_map.json   the same special tokens, for older readers

Special tokens, with the ids they get (DeepSeek-V3's spellings: U+FF5C "｜" and U+2581 "▁"):
0 BOS `<｜begin▁of▁sentence｜>`, 1 EOS `<｜end▁of▁sentence｜>`, 2 pad `<｜▁pad▁｜>`,
3 `<｜User｜>` and 4 `<｜Assistant｜>` (chat turns, as in DeepSeek-V3's chat template).

`PreTrainedTokenizerFast(tokenizer_file=...)` alone cannot tell which token is BOS or EOS (the
roles live in the config files): load the directory with `from_pretrained`, or pass
`bos_token=BOS, eos_token=EOS, pad_token=PAD`.

Pre-tokenisation: runs of digits are cut into groups of at most three (as DeepSeek-V3 does), then
GPT-2's byte-level regex split. No normaliser: the data pipeline has already normalised text, and
a tokenizer that silently rewrites text cannot round-trip it.

Public API: `BOS`, `EOS`, `PAD`, `USER`, `ASSISTANT`, `SPECIAL_TOKENS`, `train_tokenizer(texts,
vocab_size, out_dir, special_tokens) -> Path`, `train_tokenizer_from_files(paths, ...) -> TrainedTokenizer`,
`load_tokenizer(path) -> tokenizers.Tokenizer`, `special_token_ids(tokenizer) -> (bos, eos, pad)`,
`encode_texts(tokenizer, texts) -> list[np.ndarray]`.
"""

from __future__ import annotations

import itertools
import logging
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from dsv3.config import ConfigError
from dsv3.io import write_json_atomic, write_text_atomic

__all__ = [
    "BOS",
    "EOS",
    "PAD",
    "USER",
    "ASSISTANT",
    "SPECIAL_TOKENS",
    "train_tokenizer",
    "train_tokenizer_from_files",
    "TrainedTokenizer",
    "load_tokenizer",
    "special_token_ids",
    "encode_texts",
    "tokenizer_files",
    "copy_tokenizer",
]

log = logging.getLogger(__name__)

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD, USER, ASSISTANT)
TOKENIZER_FILE = "tokenizer.json"

# DeepSeek-V3's turn format: BOS, an optional system prompt, then <｜User｜>q<｜Assistant｜>a EOS.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}" + USER + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT + "{{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)


def _new_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: Path | str,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> Path:
    """Train a byte-level BPE on `texts` and write it to `out_dir`; returns the tokenizer.json path.

    `special_tokens` get ids 0, 1, ... in order; the first three are BOS, EOS and pad.
    """
    special_tokens = list(special_tokens)
    if len(special_tokens) < 3 or len(set(special_tokens)) != len(special_tokens):
        raise ConfigError(f"special_tokens must list distinct BOS, EOS and pad first, got {special_tokens}")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(special_tokens):
        raise ConfigError(f"vocab_size {vocab_size} < 256 bytes + {len(special_tokens)} special tokens")
    tokenizer = _new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=alphabet,
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if tokenizer.get_vocab_size() < vocab_size:
        log.warning("the texts support only %d tokens (asked for %d)", tokenizer.get_vocab_size(), vocab_size)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bos, eos, pad, *extra = special_tokens
    special_map = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "additional_special_tokens": extra}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "add_bos_token": False,  # the data pipeline separates documents with EOS only
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 30,
        "chat_template": CHAT_TEMPLATE,
    }
    write_text_atomic(out_dir / TOKENIZER_FILE, tokenizer.to_str(pretty=True))
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special_map)):
        write_json_atomic(out_dir / name, content)
    log.info("trained a %d-token byte-level BPE into %s", tokenizer.get_vocab_size(), out_dir)
    return out_dir / TOKENIZER_FILE


def load_tokenizer(path: Path | str) -> Tokenizer:
    """A tokenizer from a tokenizer.json file or a directory holding one."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"{file}: no tokenizer file (train one with `dsv3 tokenizer train`)")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise ConfigError(f"{file}: not a valid tokenizer.json: {str(e).splitlines()[0]}") from None


def special_token_ids(tokenizer: Tokenizer, names: Sequence[str] = (BOS, EOS, PAD)) -> tuple[int, int, int]:
    """Ids of (BOS, EOS, pad); a tokenizer without them is an error, not a silent default."""
    ids = [tokenizer.token_to_id(name) for name in names]
    missing = [name for name, i in zip(names, ids, strict=True) if i is None]
    if missing:
        raise ConfigError(f"tokenizer has no special token(s) {missing}")
    bos, eos, pad = ids
    return bos, eos, pad


def encode_texts(tokenizer: Tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
    """Token ids of each text (no special tokens added), encoded in parallel by the Rust library."""
    encodings = tokenizer.encode_batch(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.uint32) for e in encodings]


# ------------------------------------------------------------------------------------------------
# Reading the training texts
# ------------------------------------------------------------------------------------------------

EXAMPLES = 20  # skipped records kept as examples by train_tokenizer_from_files


class TrainedTokenizer(NamedTuple):
    path: Path  # tokenizer.json
    documents: int  # documents trained on
    skipped: int  # records that could not be read
    examples: list[str]  # the first EXAMPLES skipped records: 'file:line: reason: detail'


def train_tokenizer_from_files(
    paths: Iterable[Path | str],
    vocab_size: int,
    out_dir: Path | str,
    text_field: str = "text",
    limit: int | None = None,
    on_document: Callable[[], None] | None = None,
    show_progress: bool = False,
) -> TrainedTokenizer:
    """Train on the `text_field` of any input the data pipeline reads: jsonl(.gz/.zst), parquet,
    arrow, a saved `datasets` folder, a folder or glob of them.

    Unparseable records are skipped and counted (the pipeline's readers), never fatal; the first
    `EXAMPLES` of them are kept as 'file:line: reason: detail'.
    """
    from dsv3.data.document import Rejects, StepStats
    from dsv3.data.readers import InputConfig, Part, input_files, read_part

    inputs = []
    for raw in map(str, paths):
        if not any(ch in raw for ch in "*?[") and not Path(raw).exists():
            raise ConfigError(f"--input {raw}: no such file or directory")
        cfg = InputConfig(path=raw, text_field=text_field, id_field=None, meta_field=None)
        inputs += [(cfg, path, fmt) for path, fmt in input_files(cfg, where="--input")]
    stats, rejects = StepStats(), Rejects(samples=EXAMPLES)  # memory bounded however many are bad
    used = 0

    def texts() -> Iterator[str]:
        nonlocal used
        for i, (cfg, path, fmt) in enumerate(inputs):
            part = Part(name=path.name, input=i, path=str(path), format=fmt)
            for doc in read_part(part, cfg, stats, rejects):
                if limit is not None and used >= limit:
                    return
                used += 1
                if on_document is not None:
                    on_document()
                yield doc.text

    def examples() -> list[str]:
        return [f"{r['source']}: {r['reason']}: {r['error']}" for r in rejects.records]

    stream = texts()
    first = next(stream, None)
    if first is None:  # fail before writing anything
        bad = examples()
        example = f", e.g. {bad[0]}" if bad else ""
        raise ConfigError(
            f"no document with a string {text_field!r} field in the input "
            f"({rejects.count} records skipped{example})"
        )
    out = train_tokenizer(itertools.chain([first], stream), vocab_size, out_dir, show_progress=show_progress)
    return TrainedTokenizer(out, used, rejects.count, examples())


# What transformers' AutoTokenizer reads from a model directory, tokenizer.json first.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def tokenizer_files(path: Path) -> list[Path]:
    """tokenizer.json (a file, or inside a directory) and its transformers companions beside it."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    main = path / "tokenizer.json" if path.is_dir() else path
    if not main.is_file():
        raise ConfigError(f"{main}: no tokenizer file (train one with `dsv3 tokenizer train`)")
    return [main] + [folder / n for n in _TOKENIZER_FILES[1:] if (folder / n).is_file()]


def copy_tokenizer(path: Path, dest_dir: Path) -> None:
    """Copy the tokenizer into a checkpoint, so the directory loads and generates on its own."""
    main, *companions = tokenizer_files(path)
    shutil.copyfile(main, Path(dest_dir) / "tokenizer.json")
    for f in companions:
        shutil.copyfile(f, Path(dest_dir) / f.name)
