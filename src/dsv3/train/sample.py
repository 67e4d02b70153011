"""Text from a model: the trainer's evaluation samples and `dsv3 generate` on a checkpoint.

Documents in the shards are separated by EOS (no BOS), so a prompt is fed after an EOS: the
context a model saw at the start of every training document.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn

from dsv3.config import ConfigError

__all__ = [
    "sample_text",
    "tokenizer_files",
    "copy_tokenizer",
    "resolve_checkpoint",
    "generate_from_checkpoint",
]

log = logging.getLogger(__name__)

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


@torch.no_grad()
def sample_text(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
) -> str:
    """Continue `prompt` with the latent-cache decoder; the continuation, decoded.

    Sampling draws from its own generator seeded with `seed`: the training run's RNG is untouched
    and the same seed gives the same text.
    """
    from dsv3.data.tokenizer import special_token_ids
    from dsv3.infer import generate

    _, eos, _ = special_token_ids(tokenizer)
    device = next(model.parameters()).device
    ids = [eos, *tokenizer.encode(prompt, add_special_tokens=False).ids]
    was_training = model.training
    model.eval()
    try:
        out = generate(
            model, torch.tensor([ids], device=device), max_new_tokens, temperature=temperature, top_p=top_p,
            eos_token_id=eos, generator=torch.Generator(device).manual_seed(seed),
        )
    finally:
        model.train(was_training)
    new = out[0].tolist()
    if eos in new:
        new = new[: new.index(eos)]  # the document ended; what follows is padding
    return tokenizer.decode(new, skip_special_tokens=False)


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory as given; a run's output_dir → its best checkpoint by validation loss,
    else its newest complete one."""
    from dsv3.train import checkpoint as ckpt

    path = Path(path)
    if (path / "config.json").is_file():
        return path
    found = ckpt.list_checkpoints(path)
    if not found:
        raise ConfigError(f"{path}: neither a model directory (config.json) nor a run with checkpoints")
    return ckpt.best_checkpoint(path) or found[-1]


def _find_tokenizer(directory: Path) -> Path:
    if (directory / "tokenizer.json").is_file():
        return directory / "tokenizer.json"
    run_config = directory / "trainer" / "run_config.json"
    if run_config.is_file():
        ref = json.loads(run_config.read_text(encoding="utf-8")).get("data", {}).get("tokenizer")
        if ref:
            return Path(ref)
    raise ConfigError(f"{directory}: no tokenizer.json and no run config naming one: pass --tokenizer")


def generate_from_checkpoint(
    checkpoint: str | Path,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
    tokenizer: str | Path | None = None,
    device: str | None = None,
) -> str:
    """Load a checkpoint (or a run's best) with its tokenizer and continue `prompt`."""
    from dsv3.data.tokenizer import load_tokenizer
    from dsv3.model.hf import load_hf

    if max_new_tokens <= 0:
        raise ConfigError(f"--max-new-tokens {max_new_tokens}: must be positive")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ConfigError(f"temperature {temperature}, top_p {top_p}: need temperature >= 0, 0 < top_p <= 1")
    directory = resolve_checkpoint(Path(checkpoint))
    tok = load_tokenizer(tokenizer or _find_tokenizer(directory))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_hf(directory, device=device)
    if tok.get_vocab_size() > model.config.vocab_size:
        raise ConfigError(
            f"tokenizer has {tok.get_vocab_size()} tokens, model vocab_size is {model.config.vocab_size}"
        )
    log.info("generating with %s", directory)
    return sample_text(model, tok, prompt, max_new_tokens, temperature, top_p, seed)
