"""Generation with MLA's latent cache: one prefill over the prompts, then one token per step.

    new = generate(model, input_ids, 32)                          # greedy; (B, T) → (B, ≤ 32)
    new = generate(model, [[5, 9, 2], [7]], 32, temperature=0.8, top_p=0.95, eos_token_id=2,
                   generator=torch.Generator().manual_seed(0))    # prompts of different lengths

Prompts of different lengths come as a list of token lists (or 1-D tensors), left-padded here, or
as a (B, T) tensor already left-padded with `attention_mask` (1 = token, 0 = padding; the
transformers convention). Each row's positions start at 0 at its first token and padding is masked
out, so a row generates what it would alone. The result holds only the new tokens: max_new_tokens
columns, or fewer once every row has emitted `eos_token_id`; after its eos a row holds
`pad_token_id` (default: the eos id).

Speed: the cache is preallocated, decode attends in the absorbed form against the latent, and a
step makes no host sync (sampling included). On a GPU the decode step is captured once in a CUDA
graph and replayed: one launch per token instead of one per kernel (4-9x faster decoding on an
H200, docs/performance.md); `cuda_graph=False` decodes eagerly. `compile=True` runs each decoder
block through torch.compile first (dsv3.infer.compiled, as the serving engine does), so the graph
replays fused kernels; it costs a compile per kind of block the first time (about a minute on a GPU).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from dsv3.infer.cache import LatentCache
from dsv3.infer.compiled import compiled_blocks
from dsv3.infer.cuda_graph import capture

__all__ = ["generate", "sample_next", "left_pad"]

log = logging.getLogger(__name__)

EOS_CHECK_EVERY = 8  # decode steps between the host syncs that ask whether every row has finished

Prompts = torch.Tensor | Sequence[Sequence[int] | torch.Tensor]


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Next token per row (B,) from logits (B, vocab): argmax at temperature 0, else a draw from the
    smallest set of most likely tokens whose probability reaches top_p (nucleus sampling)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = (logits.float() / temperature).softmax(-1)
    if top_p >= 1:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    sorted_probs, order = probs.sort(-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # mass before it already reaches top_p
    choice = torch.multinomial(sorted_probs.masked_fill(outside, 0.0), 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


def left_pad(
    prompts: Sequence[Sequence[int] | torch.Tensor], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists → (B, T) ids left-padded with `pad_id`, and the padding columns per row (B,)."""
    rows = [torch.as_tensor(p, dtype=torch.long).flatten() for p in prompts]
    if not rows or any(r.numel() == 0 for r in rows):
        raise ValueError("generate: every prompt needs at least one token")
    T = max(r.numel() for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - r.numel() :] = r
    return ids, torch.tensor([T - r.numel() for r in rows])


def _padding_of(mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Left-padding columns per row (B,) of an attention_mask; an error for any other layout."""
    if mask.shape != shape:
        raise ValueError(f"generate: attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(shape)}")
    mask = mask.to(torch.long)
    if ((mask != 0) & (mask != 1)).any():
        raise ValueError("generate: attention_mask must hold only 0 (padding) and 1 (token)")
    if (mask.diff(dim=1) < 0).any() or (mask[:, -1] == 0).any():
        bad = int(((mask.diff(dim=1) < 0).any(1) | (mask[:, -1] == 0)).nonzero()[0])
        raise ValueError(f"generate: attention_mask row {bad} is not left-padded (zeros first, then ones)")
    return shape[1] - mask.sum(1)


def _prompts(
    input_ids: Prompts, attention_mask: torch.Tensor | None, fill: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(input_ids, torch.Tensor):
        if attention_mask is not None:
            raise ValueError("generate: attention_mask goes with a (B, T) tensor, not a list of prompts")
        return left_pad(input_ids, fill)
    if input_ids.dim() != 2 or input_ids.dtype.is_floating_point or input_ids.shape[1] == 0:
        raise ValueError(
            f"generate: input_ids must be integer (B, T) with T ≥ 1, got {tuple(input_ids.shape)}"
        )
    if attention_mask is None:
        return input_ids, torch.zeros(input_ids.shape[0], dtype=torch.long)
    return input_ids, _padding_of(attention_mask.cpu(), input_ids.shape)


def _check(name: str, token: int | None, vocab: int) -> None:
    if token is not None and not 0 <= token < vocab:
        raise ValueError(f"generate: {name} {token} is outside the vocabulary [0, {vocab})")


def _graphed(step: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor) -> Callable:
    """`step` captured in a CUDA graph for inputs shaped like `example` (a reserved decode step: the
    warm-up and the capture compute that step, the first replay computes it again, in place)."""
    static_in = example.clone()
    graph, static_out = capture(lambda: step(static_in))

    def replay(x: torch.Tensor) -> torch.Tensor:
        static_in.copy_(x)
        graph.replay()
        return static_out

    return replay


def _graphed_or_eager(step: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor) -> Callable:
    """`_graphed(step, example)`, or `step` itself when this model's decode step cannot be captured."""
    try:
        return _graphed(step, example)
    except RuntimeError as err:
        log.warning("generate: decoding without a CUDA graph (capture failed: %s)", str(err).splitlines()[0])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return step


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    input_ids: Prompts,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    fp8_cache: bool = False,
    cuda_graph: bool | None = None,
    compile: bool = False,
) -> torch.Tensor:
    """New tokens (B, N ≤ max_new_tokens) continuing each prompt (see the module docstring).

    `generator` (on the model's device) makes sampling reproducible; None draws from torch's global
    RNG. `fp8_cache` stores the latent as e4m3 with per-token scales (half the bytes of bf16).
    `cuda_graph`: None captures the decode step in a CUDA graph when the model is on a GPU (and falls
    back to eager decoding, with a warning, if the capture fails); True requires it. `compile` runs
    the decoder blocks compiled (see the module docstring).
    """
    cfg = model.config
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens {max_new_tokens} must be ≥ 1")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(
            f"generate: temperature {temperature}, top_p {top_p}: need temperature ≥ 0, 0 < top_p ≤ 1"
        )
    _check("eos_token_id", eos_token_id, cfg.vocab_size)
    _check("pad_token_id", pad_token_id, cfg.vocab_size)
    fill = pad_token_id if pad_token_id is not None else eos_token_id if eos_token_id is not None else 0
    weight = model.lm_head.weight
    device, dtype = weight.device, weight.dtype
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"generate: cuda_graph needs a model on a CUDA device, not {device}")
    required = bool(cuda_graph)  # asked for explicitly: a failed capture is an error, not a fallback
    cuda_graph = device.type == "cuda" if cuda_graph is None else cuda_graph

    ids, pad = _prompts(input_ids, attention_mask, fill)
    if int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size:
        raise ValueError(f"generate: input_ids hold ids outside the vocabulary [0, {cfg.vocab_size})")
    ids = ids.to(device)
    B, T = ids.shape
    cache = LatentCache(
        cfg, B, T + max_new_tokens - 1, dtype=dtype, device=device, fp8=fp8_cache, pad=pad, static=cuda_graph
    )

    run_block = compiled_blocks() if compile else None

    def forward(chunk: torch.Tensor) -> torch.Tensor:
        """Logits (B, vocab) of the chunk's last column, after writing the chunk into the cache."""
        hidden, _, _ = model.hidden_states(chunk, cache.prepare(), cache=cache, run_block=run_block)
        return model.lm_head(hidden[:, -1]).float()

    out = torch.full((B, max_new_tokens), fill, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    # A model compiled for training would recompile for every cache length: run it eagerly here
    # (`compile` runs the blocks through their own compiled function, which leaves this stance).
    with torch.compiler.set_stance("force_eager"):
        cache.reserve(T)
        logits = forward(ids)
        decode, capture = forward, cuda_graph  # captured at the first decode step
        for t in range(max_new_tokens):
            token = sample_next(logits, temperature, top_p, generator)
            if eos_token_id is not None:
                token = token.masked_fill(done, fill)
                lengths += ~done
                done |= token == eos_token_id
            out[:, t] = token
            if t + 1 == max_new_tokens:
                break
            if eos_token_id is not None and t % EOS_CHECK_EVERY == EOS_CHECK_EVERY - 1 and bool(done.all()):
                break
            cache.reserve(1)
            if capture:
                capture = False
                graphed = _graphed if required else _graphed_or_eager
                decode = graphed(forward, token.unsqueeze(1))
            logits = decode(token.unsqueeze(1))
    if eos_token_id is None:
        return out
    return out[:, : int(lengths.max())]
