"""Multi-head Latent Attention (MLA), DeepSeek-V2/V3's attention with a compressed KV latent.

Queries go through a low-rank bottleneck (q_a_proj → RMSNorm → q_b_proj; a plain q_proj when
q_lora_rank is null). Keys and values come from one small latent per token: kv_a_proj_with_mqa
gives c_kv (kv_lora_rank) plus one rope key k_pe shared by all heads; kv_b_proj expands c_kv to
per-head k_nope and v. Only the rope slices carry position (decoupled RoPE).

The pieces are separate methods so a decode cache can hold just (c_kv, k_pe): `query` and
`latent_kv` give them, `expand_kv` + `causal_attention` is the training/prefill path, and
`absorbed_attention` the decode path of `forward_cached` (generation, dsv3.infer).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model.gemv import Linear, linear
from dsv3.model.norm import RMSNorm
from dsv3.model.packing import pack_linears, packed_weight
from dsv3.model.rope import apply_rope

__all__ = ["MLA", "LayerCache", "causal_attention", "SDPA_PAD_V"]

# MLA's v is narrower than q·k (v_head_dim < qk_head_dim). Flash SDPA wants one head dim for q, k
# and v, so v is padded with zeros (and the output sliced) unless cuDNN's fused attention will take
# it as is (Hopper or newer): without either, torch falls back to the slower memory-efficient kernel.
# None decides per device; True/False force it (benchmarks measure both).
SDPA_PAD_V: bool | None = None

# transformers and DeepSeek's reference build the two latent norms with the default eps,
# independent of config.rms_norm_eps.
LATENT_NORM_EPS = 1e-6


@torch.compiler.assume_constant_result
def _pad_v(device_index: int | None) -> bool:
    """Whether SDPA on this CUDA device needs v padded to the q·k head dim (see SDPA_PAD_V)."""
    if SDPA_PAD_V is not None:
        return SDPA_PAD_V
    cudnn_takes_narrow_v = torch.cuda.get_device_capability(device_index) >= (9, 0)
    return not (cudnn_takes_narrow_v and torch.backends.cuda.cudnn_sdp_enabled())


class LayerCache(Protocol):
    """What MLA needs of a generation cache for one layer; `dsv3.infer` implements it.

    `update` stores the chunk's latent (c_kv (B, T, r), k_pe (B, T, rope)) and returns every cached
    latent the chunk may attend to, (B, S, r + rope) in the compute dtype, with its mask (B, T, S)
    (True: may attend). `absorb` asks for the absorbed form for this chunk: the cache knows when a
    chunk is a few queries (decode, speculative verification) against a long context.
    """

    absorb: bool

    def update(self, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal attention through torch's fused SDPA: q (B, T, H, Dqk), k (B, S, H, Dqk), v (B, S, H, Dv)
    → (B, T, H, Dv). `mask` (B, T, S) bool (True: may attend) replaces the causal mask when given:
    left padding, or queries that come after a cached prefix (S > T)."""
    dv = v.shape[-1]
    if dv < q.shape[-1] and q.is_cuda and _pad_v(q.device.index):
        v = F.pad(v, (0, q.shape[-1] - dv))
    # SDPA takes (B, H, T, D); the transposes are views whose last dim stays contiguous.
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=None if mask is None else mask.unsqueeze(1),
        is_causal=mask is None,
        scale=scale,
    )
    return out.transpose(1, 2)[..., :dv]  # (B, T, H, Dv)


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.qk_nope_head_dim, self.qk_rope_head_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.qk_head_dim, self.v_head_dim = cfg.qk_head_dim, cfg.v_head_dim
        self.q_lora_rank, self.kv_lora_rank = cfg.q_lora_rank, cfg.kv_lora_rank
        self.softmax_scale = cfg.softmax_scale
        self.rope_interleave = cfg.rope_interleave
        d, h = cfg.hidden_size, cfg.num_attention_heads
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(d, h * self.qk_head_dim)
        else:
            self.q_a_proj = Linear(d, cfg.q_lora_rank)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = Linear(cfg.q_lora_rank, h * self.qk_head_dim)
        self.kv_a_proj_with_mqa = Linear(d, cfg.kv_latent_dim)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim))
        self.o_proj = Linear(h * cfg.v_head_dim, d)
        self.packed_inputs: torch.Tensor | None = None  # `pack_inputs`: q_a (or q) and kv_a as one weight

    def _query_in(self) -> nn.Linear:
        return self.q_proj if self.q_lora_rank is None else self.q_a_proj

    def pack_inputs(self) -> None:
        """Inference: the query's first projection and kv_a as one GEMM (dsv3.model.packing)."""
        inputs = self._query_in(), self.kv_a_proj_with_mqa
        self.packed_inputs = pack_linears(*inputs, packed=self.packed_inputs)

    def _input_projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x → (q_a(x) or q(x), kv_a(x)): one GEMM when packed (and no gradient is recorded)."""
        packed = packed_weight(self.packed_inputs)
        if packed is None:
            return self._query_in()(x), self.kv_a_proj_with_mqa(x)
        q_in, kv = linear(x, packed).split(
            [self._query_in().out_features, self.kv_a_proj_with_mqa.out_features], dim=-1
        )
        return q_in, kv

    def query(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, d) → q_nope (B, T, H, qk_nope_head_dim), q_pe (B, T, H, qk_rope_head_dim) rotated."""
        return self._query(self._query_in()(x), cos, sin)

    def _query(
        self, q_in: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The query from its first projection (q_a(x), or q(x) without a low-rank bottleneck)."""
        B, T, _ = q_in.shape
        q = q_in if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(q_in))
        q = q.view(B, T, self.n_heads, self.qk_head_dim)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin, self.rope_interleave)

    def latent_kv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, d) → the latent a cache keeps: c_kv (B, T, r) normed, k_pe (B, T, rope) rotated."""
        return self._latent(self.kv_a_proj_with_mqa(x), cos, sin)

    def _latent(
        self, kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The latent from kv_a(x) (B, T, r + rope)."""
        c_kv, k_pe = kv.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin, self.rope_interleave).squeeze(2)
        return self.kv_a_layernorm(c_kv), k_pe

    def expand_kv(self, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent → full keys (B, S, H, qk_head_dim) and values (B, S, H, v_head_dim)."""
        B, S, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv).view(B, S, self.n_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k_pe = k_pe.unsqueeze(2).expand(B, S, self.n_heads, self.qk_rope_head_dim)
        return torch.cat((k_nope, k_pe), dim=-1), v

    def absorbed_attention(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Attention against the cached latent (B, S, kv_lora_rank + rope) itself → (B, T, H, v_head_dim).

        W_UK is folded into the queries and W_UV applied after, so no per-head key or value is ever
        built: each step reads kv_lora_rank + rope values per cached token, shared by all heads.
        """
        B, T, H, _ = q_nope.shape
        r = self.kv_lora_rank
        w = self.kv_b_proj.weight.view(H, self.qk_nope_head_dim + self.v_head_dim, r)
        w_uk, w_uv = w.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)  # (H, dn, r), (H, dv, r)
        q_lat = torch.einsum("bthd,hdr->bthr", q_nope, w_uk)  # (B, T, H, r)
        q = torch.cat((q_lat, q_pe), dim=-1).view(B, T * H, -1)  # every head against one shared key
        scores = torch.bmm(q, latent.transpose(1, 2)).view(B, T, H, -1).float() * self.softmax_scale
        probs = scores.masked_fill(~mask.unsqueeze(2), float("-inf")).softmax(-1)  # (B, T, H, S)
        out_lat = torch.bmm(probs.to(latent.dtype).view(B, T * H, -1), latent[..., :r])  # values: c_kv
        out_lat = out_lat.view(B, T, H, r)
        return torch.einsum("bthr,hvr->bthv", out_lat, w_uv)  # (B, T, H, v_head_dim)

    def forward_cached(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache
    ) -> torch.Tensor:
        """Attention for generation: append this chunk's (c_kv, k_pe) to `cache`, attend over all of it.

        A few queries per row (decode; the cache's `absorb`) take the absorbed form; a prompt expands
        the latent to per-head keys and values for SDPA, which is cheaper when T queries share them.
        """
        B, T, _ = x.shape
        q_in, kv = self._input_projections(x)
        q_nope, q_pe = self._query(q_in, cos, sin)
        latent, mask = cache.update(*self._latent(kv, cos, sin))  # (B, S, r + rope), (B, T, S)
        if cache.absorb:
            out = self.absorbed_attention(q_nope, q_pe, latent, mask)
        else:
            k, v = self.expand_kv(*latent.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1))
            out = causal_attention(torch.cat((q_nope, q_pe), dim=-1), k, v, self.softmax_scale, mask)
        return self.o_proj(out.reshape(B, T, self.n_heads * self.v_head_dim))

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None = None
    ) -> torch.Tensor:
        """Causal self-attention over x (B, T, d) at the positions cos/sin (1 or B, T, rope/2) encode;
        with a `cache` (generation), over the cached tokens too (`forward_cached`)."""
        if cache is not None:
            return self.forward_cached(x, cos, sin, cache)
        B, T, _ = x.shape
        q_in, kv = self._input_projections(x)
        q_nope, q_pe = self._query(q_in, cos, sin)
        k, v = self.expand_kv(*self._latent(kv, cos, sin))
        q = torch.cat((q_nope, q_pe), dim=-1)  # (B, T, H, qk_head_dim)
        out = causal_attention(q, k, v, self.softmax_scale)  # (B, T, H, v_head_dim)
        return self.o_proj(out.reshape(B, T, self.n_heads * self.v_head_dim))
