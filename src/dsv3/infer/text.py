"""Text in, text out: a sample during training (`sample_text`, the static-batch decoder on the
model being trained) and `dsv3 generate --prompt` (`generate_from_checkpoint`, the serving engine).

Documents in the shards are separated by EOS (no BOS), so a prompt is fed after an EOS: the
context a model saw at the start of every training document.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn

from dsv3.checkpoints import Which
from dsv3.config import ConfigError
from dsv3.data.tokenizer import special_token_ids
from dsv3.infer.engine import EngineConfig
from dsv3.infer.generate import generate
from dsv3.infer.llm import LLM
from dsv3.infer.sampling import SamplingParams

__all__ = ["sample_text", "generate_from_checkpoint"]

@torch.no_grad()
def sample_text(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
    cuda_graph: bool | None = None,
) -> str:
    """Continue `prompt` with the latent-cache decoder; the continuation, decoded.

    Sampling draws from its own generator seeded with `seed`: the training run's RNG is untouched
    and the same seed gives the same text. `cuda_graph` as in `generate` (False for a sharded model,
    whose every step talks to other ranks).
    """
    _, eos, _ = special_token_ids(tokenizer)
    device = next(model.parameters()).device
    ids = [eos, *tokenizer.encode(prompt, add_special_tokens=False).ids]
    was_training = model.training
    model.eval()
    try:
        out = generate(
            model, torch.tensor([ids], device=device), max_new_tokens, temperature=temperature, top_p=top_p,
            eos_token_id=eos, generator=torch.Generator(device).manual_seed(seed), cuda_graph=cuda_graph,
        )
    finally:
        model.train(was_training)
    new = out[0].tolist()
    if eos in new:
        new = new[: new.index(eos)]  # the document ended; what follows is padding
    return tokenizer.decode(new, skip_special_tokens=False)


def generate_from_checkpoint(
    checkpoint: str | Path,
    prompt: str,
    *,
    which: Which = "best",
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
    tokenizer: str | Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
    config: EngineConfig | None = None,
) -> str:
    """Load a checkpoint (or a run's best or last) with its tokenizer and continue `prompt` through
    the serving engine (`LLM`, one sequence unless `config` says otherwise); the continuation,
    special tokens kept as text."""
    if max_new_tokens <= 0:
        raise ConfigError(f"--max-new-tokens {max_new_tokens}: must be positive")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ConfigError(f"temperature {temperature}, top_p {top_p}: need temperature >= 0, 0 < top_p <= 1")
    config = config or EngineConfig(max_num_seqs=1)
    llm = LLM(checkpoint, which=which, tokenizer=tokenizer, device=device, dtype=dtype, config=config)
    params = SamplingParams(
        max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, skip_special_tokens=False
    )
    return llm.generate(prompt, params)[0].outputs[0].text
