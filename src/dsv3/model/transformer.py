"""The DeepSeek-V3 decoder: blocks of MLA + (dense FFN | DeepSeekMoE), and Multi-Token Prediction.

API (what the trainer, generation and the HF interchange build on):

    model = Transformer(cfg, seed=0)            # DeepSeek-V3 init (std 0.006), same on any device
    logits = model(input_ids, positions=None)   # (B, T) → (B, T, vocab); positions (T,) or (B, T)
    out = model.forward_with_losses(input_ids, labels, mtp_lambda=0.3, balance_alpha=1e-4)
    out.loss.backward()                         # = lm_loss + mtp_loss + balance_loss (see ModelOutput)
    model.update_bias(gamma)                    # aux-loss-free balancing from each layer's last load
    model.expert_load()                         # (n_moe_layers, E) tokens per expert, last forward
    model.moe_layers(), model.blocks()          # iterate MoE layers / decoder blocks (main, then MTP)
    model.activation_checkpointing = True       # recompute each block in backward ("selective": all
                                                # but its GEMM and attention outputs; compiles with it)
    model.loss_chunk_tokens = 4096              # training losses a chunk of positions at a time
    model.compile_blocks()                      # torch.compile(fullgraph=True) per block
    model.mtp_logits(input_ids)                 # (D, B, T, vocab), e.g. for speculative drafts
    model(ids, positions, cache=cache)          # generation: cache[i] is layer i's LayerCache (dsv3.infer)
    dsv3.model.hf.load_hf(path), save_hf(model, path)   # Hugging Face checkpoints

`labels[:, t]` is the target of position t (the next token), -100 where there is none. MTP depth
d (1..D) at position t combines the previous depth's hidden state (depth 0: the main model's final
normed state; depth d > 1: depth d-1's normed state, as transformers chains them) with the
embedding of token t+d and predicts labels[:, t+d]; it shares the main embedding and output head.
State-dict keys are the Hugging Face DeepSeek-V3 names except the stacked experts and `mtp.{d}.*`
(HF: `model.layers.{num_hidden_layers+d}.*`), see hf.py.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from dsv3.config import ModelConfig
from dsv3.model.attention import MLA, LayerCache
from dsv3.model.gemv import Linear
from dsv3.model.linear_cross_entropy import IGNORE_INDEX, chunk_loss_and_grad, linear_cross_entropy
from dsv3.model.moe import MLP, MoE
from dsv3.model.norm import RMSNorm
from dsv3.model.rope import rope_cos_sin, rope_inv_freq

__all__ = [
    "Block", "MTP", "ModelOutput", "Transformer", "INIT_STD", "IGNORE_INDEX", "initial_value",
    "cross_entropy", "shift_left", "set_activation_checkpointing",
]

INIT_STD = 0.006  # DeepSeek-V3 §4.2: every learnable matrix ~ N(0, 0.006²)


class Block(nn.Module):
    """Pre-norm decoder block: x + MLA(norm(x)), then + FFN(norm(x)); the FFN is MoE past the dense layers."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.mlp = MoE(cfg) if self.is_moe else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.checkpointing: bool | str = False  # see forward; set through set_activation_checkpointing

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        balance: bool = False,
        cache: LayerCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, d) → (x (B, T, d), this block's balance loss or None); `cache`: generation only.

        With `checkpointing` the block is recomputed in the backward (whole, keeping its input, or
        "selective": all but its GEMM and attention outputs). The checkpoint is inside the forward so
        that a compiled block traces it: the compiler then applies the selective policy to its graph,
        where wrapping a compiled block in a checkpoint would run it under a Python dispatch mode
        (slower than recomputing everything)."""
        if self.checkpointing and torch.is_grad_enabled() and cache is None:
            context = {"context_fn": _save_matmuls} if self.checkpointing == "selective" else {}
            return checkpoint(self._layer, x, cos, sin, balance, use_reentrant=False, **context)
        return self._layer(x, cos, sin, balance, cache)

    def _layer(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, balance: bool,
        cache: LayerCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            y, aux = self.mlp(h, balance)
            return x + y, aux
        return x + self.mlp(h), None


def set_activation_checkpointing(root: nn.Module, mode: bool | str) -> None:
    """Recompute every decoder block under `root` in the backward: False, True (whole) or "selective"."""
    if mode not in (False, True, "selective"):
        raise ValueError(f"activation checkpointing: expected false, true or selective, got {mode!r}")
    for module in root.modules():
        if isinstance(module, Block):
            module.checkpointing = mode


class MTP(nn.Module):
    """One MTP depth: project [norm(embedding of token t+d); norm(h_{d-1})] to d, run a block."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.enorm = RMSNorm(d, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * d, d)
        self.block = Block(cfg, layer_idx)
        self.head_norm = RMSNorm(d, cfg.rms_norm_eps)  # HF: shared_head.norm

    def forward(
        self,
        h_prev: torch.Tensor,
        emb: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        balance: bool = False,
        cache: LayerCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """h_prev, emb (B, T, d) → (normed hidden (B, T, d) for the shared head, balance loss or None);
        `cache`: its block's latent cache when drafting tokens (speculative decoding, dsv3.infer)."""
        h = self.eh_proj(torch.cat((self.enorm(emb), self.hnorm(h_prev)), dim=-1))
        h, aux = self.block(h, cos, sin, balance, cache)
        return self.head_norm(h), aux


@dataclass
class ModelOutput:
    """What `forward_with_losses` returns; `loss` is the sum to backpropagate."""

    loss: torch.Tensor
    lm_loss: torch.Tensor
    mtp_loss: torch.Tensor | None  # λ · mean over depths; None when not computed
    mtp_losses: torch.Tensor | None  # (D,) unweighted cross-entropy per depth
    balance_loss: torch.Tensor | None  # α · Σ_layers mean_batch Σ_i f_i·P_i; None when α = 0
    logits: torch.Tensor | None  # (B, T, vocab) of the main head


def initial_value(
    name: str, shape: Sequence[int], seed: int, norm: bool, std: float = INIT_STD
) -> torch.Tensor:
    """DeepSeek-V3's initial value of parameter `name` (float32, CPU): ones for a norm, else N(0, std²)
    drawn from a generator seeded by (seed, name), so it depends on nothing else: not the device, the
    construction order, or how the parameter is later sharded."""
    if norm:
        return torch.ones(tuple(shape))
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.empty(tuple(shape), dtype=torch.float32).normal_(0.0, std, generator=gen)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy in float32; 0 (not NaN) when every target is ignored, with no host sync."""
    total = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


# Selective activation checkpointing keeps what is costly to compute again (the outputs of GEMMs and of
# attention) and remakes the rest in the backward: norms, RoPE, SwiGLU's element-wise part, routing,
# the gathers into expert order. Ops that do not exist in a build are skipped.
_SAVED_OPS = tuple(
    getattr(torch.ops.aten, name).default
    for name in ("mm", "addmm", "bmm", "_grouped_mm", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                 "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(torch.ops.aten, name)
)


def _save_matmuls():
    def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def shift_left(x: torch.Tensor, d: int, fill: int) -> torch.Tensor:
    """x[:, t + d] at position t, `fill` past the end (B, T)."""
    return F.pad(x[:, d:], (0, min(d, x.shape[1])), value=fill)


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a + b


class Transformer(nn.Module):
    """DeepseekV3ForCausalLM: embed → blocks → norm → lm_head, plus the MTP depths."""

    def __init__(self, cfg: ModelConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = cfg
        L, d = cfg.num_hidden_layers, cfg.hidden_size
        self.model = nn.ModuleDict(
            {
                "embed_tokens": nn.Embedding(cfg.vocab_size, d),
                "layers": nn.ModuleList(Block(cfg, i) for i in range(L)),
                "norm": RMSNorm(d, cfg.rms_norm_eps),
            }
        )
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.mtp = nn.ModuleList(MTP(cfg, L + k) for k in range(cfg.num_nextn_predict_layers))
        inv_freq, self.rope_attention_factor = rope_inv_freq(cfg)
        self.register_buffer("rope_inv_freq", inv_freq, persistent=False)
        self.loss_chunk_tokens = 0  # > 0: training losses without the whole logits (linear_cross_entropy)
        self._chunk_loss = chunk_loss_and_grad
        self.init_weights(seed)

    # --- forward -------------------------------------------------------------------------------
    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (…, T, qk_rope_head_dim/2) for positions (T,) or (B, T)."""
        return rope_cos_sin(self.rope_inv_freq, positions, self.rope_attention_factor)

    @property
    def activation_checkpointing(self) -> bool | str:
        """Whether (True / "selective") the decoder blocks are recomputed in the backward."""
        return next(self.blocks()).checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, mode: bool | str) -> None:
        set_activation_checkpointing(self, mode)

    def _hidden_states(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        balance: bool = False,
        cache: Sequence[LayerCache] | None = None,
        run_block: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor]]:
        """input_ids (B, T) → (final normed hidden (B, T, d), summed balance loss or None, (cos, sin)).

        With a `cache` (dsv3.infer), each layer stores the chunk's latent and attends over the cached
        tokens too; `positions` then say where each row's tokens sit (left padding shifts them).
        `run_block(block, h, cos, sin, balance, cache)` runs each decoder block in place of calling
        it: the inference engine passes a compiled one (one compile for all blocks alike)."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        cos, sin = self.rope(positions)
        h = self.model.embed_tokens(input_ids)
        aux = None
        for i, block in enumerate(self.model.layers):
            args = (h, cos, sin, balance, None if cache is None else cache[i])
            h, a = block(*args) if run_block is None else run_block(block, *args)
            aux = _add(aux, a)
        return self.model.norm(h), aux, (cos, sin)

    # The entry point for callers outside the model (generation, evaluation). FSDP wraps it on the
    # instance to gather the root's weights around it; the model's own methods call `_hidden_states`,
    # so one FSDP entry point never runs inside another (a nested one frees the head's gathered
    # weight before the backward has used it, on the GPU).
    hidden_states = _hidden_states

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: Sequence[LayerCache] | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for input_ids (B, T); `positions` (T,) or (B, T) default to 0..T-1."""
        h, _, _ = self._hidden_states(input_ids, positions, cache=cache)
        return self.lm_head(h)

    def _head_loss(self, h: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, vocab) and their mean cross-entropy against targets (B, T)."""
        logits = self.lm_head(h)
        return logits, cross_entropy(logits, targets)

    def _loss(
        self, h: torch.Tensor, targets: torch.Tensor, logits_wanted: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(logits or None, mean cross-entropy): chunked when `loss_chunk_tokens` is set and no logits
        are wanted."""
        if self.loss_chunk_tokens and not logits_wanted:
            chunk = self.loss_chunk_tokens
            loss = linear_cross_entropy(h, self.lm_head.weight, targets, chunk, self._chunk_loss)
            return None, loss
        return self._head_loss(h, targets)

    def _mtp_states(
        self, h: torch.Tensor, input_ids: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], balance: bool
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Yield each depth's normed hidden state (B, T, d) and balance loss, depth 1 first."""
        for depth, layer in enumerate(self.mtp, start=1):
            emb = self.model.embed_tokens(shift_left(input_ids, depth, 0))
            h, aux = layer(h, emb, *rope, balance)
            yield h, aux

    def forward_with_losses(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        *,
        mtp_lambda: float = 0.0,
        balance_alpha: float = 0.0,
        return_logits: bool = True,
    ) -> ModelOutput:
        """The training forward: LM loss, MTP loss (when mtp_lambda > 0), balance loss (when α > 0)."""
        balance = balance_alpha > 0
        h, aux, rope = self._hidden_states(input_ids, balance=balance)
        logits, lm_loss = self._loss(h, labels, return_logits)
        mtp_losses = mtp_loss = None
        if mtp_lambda > 0 and len(self.mtp):
            losses = []
            for depth, (h_d, a) in enumerate(self._mtp_states(h, input_ids, rope, balance), start=1):
                losses.append(self._loss(h_d, shift_left(labels, depth, IGNORE_INDEX), False)[1])
                aux = _add(aux, a)
            mtp_losses = torch.stack(losses)
            mtp_loss = mtp_lambda * mtp_losses.mean()
        balance_loss = balance_alpha * aux if balance and aux is not None else None
        loss = lm_loss
        for extra in (mtp_loss, balance_loss):
            if extra is not None:
                loss = loss + extra
        return ModelOutput(
            loss, lm_loss, mtp_loss, mtp_losses, balance_loss, logits if return_logits else None
        )

    @torch.no_grad()
    def mtp_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Each MTP depth's logits (D, B, T, vocab): depth d at position t predicts token t+d+1."""
        h, _, rope = self._hidden_states(input_ids)
        return torch.stack([self.lm_head(h_d) for h_d, _ in self._mtp_states(h, input_ids, rope, False)])

    # --- training helpers ----------------------------------------------------------------------
    def moe_layers(self) -> Iterator[MoE]:
        """Every MoE layer, main blocks first, then the MTP blocks."""
        return (m for m in self.modules() if isinstance(m, MoE))

    def expert_load(self) -> torch.Tensor:
        """Tokens per expert of the last forward, one row per MoE layer (n_moe_layers, E)."""
        return torch.stack([m.tokens_per_expert for m in self.moe_layers()])

    def update_bias(self, gamma: float) -> None:
        """Apply the aux-loss-free bias update to every MoE layer from its last forward's load."""
        for moe in self.moe_layers():
            moe.update_bias(gamma)

    def blocks(self) -> Iterator[Block]:
        """Every decoder block, main then MTP: the unit of checkpointing, compilation and sharding."""
        yield from self.model.layers
        yield from (layer.block for layer in self.mtp)

    def compile_blocks(self, **kwargs) -> None:
        """torch.compile each block's forward in place, and the output head with its loss, so the
        float32 upcast of the logits fuses into the cross-entropy (fullgraph unless told otherwise)."""
        kwargs.setdefault("fullgraph", True)
        for block in self.blocks():
            block.compile(**kwargs)
        self._head_loss = torch.compile(self._head_loss, **kwargs)
        self._chunk_loss = torch.compile(chunk_loss_and_grad, **kwargs)

    def pack_for_inference(self) -> None:
        """Each pair of linears that reads the same input becomes one GEMM (MLA's q_a and kv_a, every
        SwiGLU's gate and up; dsv3.model.packing): fewer kernels a decode step. Call once the model is
        on its final device and dtype; parameters keep their names and values. Calling it again keeps
        the packing that still holds the weights (an earlier engine's CUDA graphs read it)."""
        for module in self.modules():
            if isinstance(module, (MLA, MLP)):
                module.pack_inputs()

    def compile_model(self, **kwargs) -> None:
        """torch.compile the whole training forward (`forward_with_losses`) as one graph: kernels fuse
        across block boundaries too, for one compile over every layer instead of one per kind of block.
        Other entry points (generation, evaluation's `hidden_states`) stay eager."""
        self.forward_with_losses = torch.compile(self.forward_with_losses, **kwargs)

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = INIT_STD) -> None:
        """DeepSeek-V3's init: matrices ~ N(0, std²), norms 1, router bias 0.

        Each tensor draws from a CPU generator seeded by (seed, its name), so the weights do not
        depend on the device, the construction order, or which other tensors exist.
        """
        if self.lm_head.weight.is_meta:
            return
        norms = self.norm_weights()
        for name, p in self.named_parameters():
            p.copy_(initial_value(name, p.shape, seed, id(p) in norms, std))
        for moe in self.moe_layers():
            moe.gate.e_score_correction_bias.zero_()
        self.init_buffers()

    def norm_weights(self) -> set[int]:
        """ids of the RMSNorm scales (initialised to ones, never decayed)."""
        return {id(m.weight) for m in self.modules() if isinstance(m, RMSNorm)}

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Recompute the non-persistent buffers (after `to_empty` from the meta device)."""
        self.rope_inv_freq = rope_inv_freq(self.config)[0].to(self.rope_inv_freq.device)
        for moe in self.moe_layers():
            moe.tokens_per_expert.zero_()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.config.tie_word_embeddings:  # moving off the meta device makes new Parameters: re-tie
            self.lm_head.weight = self.model.embed_tokens.weight
        if self.rope_inv_freq.dtype != torch.float32:  # model.to(bf16) must not round the frequencies
            self.rope_inv_freq = rope_inv_freq(self.config)[0].to(self.rope_inv_freq.device)
        return self

    def num_params(self, mtp: bool = False) -> int:
        """Parameters of the main model (tied tensors once), plus the MTP modules when `mtp`."""
        params = {id(p): p for p in self.parameters()}
        if not mtp:
            for p in self.mtp.parameters():
                params.pop(id(p), None)
        return sum(p.numel() for p in params.values())
