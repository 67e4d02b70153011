"""Models to evaluate: a dsv3 checkpoint, or any transformers causal LM directory, as a `CausalLM`.

    lm = load_checkpoint("runs/demo")                  # best checkpoint of a run, its tokenizer
    lm = load_transformers("path/to/hf_model")          # AutoModelForCausalLM + AutoTokenizer

A dsv3 checkpoint is read with `dsv3.model.hf.load_hf` and generates with `dsv3.infer.generate`
(batched, latent cache, CUDA graphs on a GPU); every text follows one EOS, the separator its
training documents followed. A transformers model generates with its own `generate`; texts
follow the BOS when its tokenizer adds one, else the EOS. `generate_tokens` is the one place
to plug in another generation engine.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn

from dsv3.checkpoints import Which, checkpoint_tokenizer, resolve_checkpoint
from dsv3.config import ConfigError
from dsv3.data.tokenizer import load_tokenizer, special_token_ids
from dsv3.eval.lm import CausalLM
from dsv3.infer import generate
from dsv3.model.hf import load_hf

__all__ = [
    "TokenizersCodec",
    "TransformersCodec",
    "load_checkpoint",
    "load_transformers",
    "wrap_dsv3",
    "default_device",
]

log = logging.getLogger(__name__)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _until(tokens: list[int], eos: int | None) -> list[int]:
    return tokens[: tokens.index(eos)] if eos is not None and eos in tokens else tokens


class TokenizersCodec:
    """A `tokenizers.Tokenizer` (dsv3's own): no special tokens added, EOS as the prefix."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        _, self.eos_id, _ = special_token_ids(tokenizer)
        self.prefix = [self.eos_id]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


class TransformersCodec:
    """A transformers tokenizer: BOS as the prefix when it adds one to an encoding, else EOS."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        bos = tokenizer.bos_token_id
        adds_bos = bos is not None and tokenizer("a").input_ids[:1] == [bos]
        first = bos if adds_bos else self.eos_id if self.eos_id is not None else bos
        if first is None:
            raise ConfigError(f"{tokenizer.name_or_path}: the tokenizer has neither a BOS nor an EOS token")
        self.prefix = [first]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False).input_ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def wrap_dsv3(
    model: nn.Module, tokenizer: Tokenizer, name: str, max_length: int | None = None, **batching
) -> CausalLM:
    """A dsv3 `Transformer` (in eval mode, on its device) and its tokenizer as a `CausalLM`."""
    codec = TokenizersCodec(tokenizer)
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        raise ConfigError(
            f"tokenizer has {tokenizer.get_vocab_size()} tokens, model vocab_size is "
            f"{model.config.vocab_size}"
        )

    def forward(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden, _, _ = model.hidden_states(ids)
        return model.lm_head(hidden[mask])  # only the scored positions reach the vocabulary

    def generate_tokens(
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        generator: torch.Generator,
    ) -> list[list[int]]:
        out = generate(
            model, prompts, max_new_tokens, temperature, top_p, eos_token_id=codec.eos_id, generator=generator
        )
        return [_until(row, codec.eos_id) for row in out.tolist()]

    device = model.lm_head.weight.device
    return CausalLM(
        name,
        forward,
        generate_tokens,
        codec,
        max_length or model.config.max_position_embeddings,
        device,
        **batching,
    )


def load_checkpoint(
    checkpoint: str | Path,
    which: Which = "best",
    *,
    tokenizer: str | Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
    max_length: int | None = None,
    **batching,
) -> CausalLM:
    """A dsv3 checkpoint (or a run's best or last) with its tokenizer, ready to score and generate."""
    directory = resolve_checkpoint(checkpoint, which)
    tok = load_tokenizer(tokenizer or checkpoint_tokenizer(directory))
    model = load_hf(directory, dtype=dtype, device=device or default_device()).eval()
    log.info("evaluating %s", directory)
    return wrap_dsv3(model, tok, str(directory), max_length, **batching)


def _import_transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("--hf needs transformers: pip install 'dsv3[hf]'") from None
    return transformers


def wrap_transformers(model, tokenizer, name: str, max_length: int | None = None, **batching) -> CausalLM:
    """A transformers causal LM (in eval mode, on its device) and its tokenizer as a `CausalLM`."""
    codec = TransformersCodec(tokenizer)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else codec.prefix[0]

    def forward(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids).logits[mask]

    def generate_tokens(
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        generator: torch.Generator,
    ) -> list[list[int]]:
        T = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (T - len(p)) + p for p in prompts], device=device)
        attention = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], device=device)
        sampling = (
            dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
            if temperature
            else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        )
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)  # transformers samples from the global RNG
            out = model.generate(
                input_ids=ids,
                attention_mask=attention,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                eos_token_id=codec.eos_id,
                **sampling,
            )
        return [_until(row, codec.eos_id) for row in out[:, T:].tolist()]

    if max_length is None:
        max_length = getattr(model.config, "max_position_embeddings", None) or 2048
    return CausalLM(name, forward, generate_tokens, codec, max_length, device, **batching)


def load_transformers(
    path: str | Path,
    *,
    device: str | None = None,
    dtype: str | None = None,
    max_length: int | None = None,
    **batching,
) -> CausalLM:
    """Any transformers causal LM directory (AutoModelForCausalLM, AutoTokenizer), evaluated the same way."""
    transformers = _import_transformers()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path}: not a transformers model directory (no config.json)")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto")
    model = model.to(device or default_device()).eval()
    log.info("evaluating %s (transformers %s)", path, type(model).__name__)
    return wrap_transformers(model, tokenizer, str(path), max_length, **batching)
