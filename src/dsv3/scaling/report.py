"""The tables `dsv3 plan` prints and the docs/scaling.md page, built from `Plan`s."""

from __future__ import annotations

from dsv3.config import ParallelConfig
from dsv3.scaling.layout import reshards_after_forward
from dsv3.scaling.memory import HEADROOM, GiB
from dsv3.scaling.plan import Plan

__all__ = [
    "DOCS_COMMAND", "describe_layout", "human_bytes", "human_count", "markdown_report", "plan_sections",
]


Section = tuple[str, list[tuple[str, list[str]]]]  # title, rows of (label, one cell per plan)


def _si(x: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.0f} {unit}"


def human_count(x: float, digits: int = 2) -> str:
    """1.24B, 205.23M: counts for people; JSON output keeps the exact integers."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.{digits}f}{suffix}"
    return f"{x:.0f}"


def human_bytes(n: float) -> str:
    for scale, unit in ((GiB, "GiB"), (1024**2, "MiB"), (1024, "KiB")):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def describe_layout(p: ParallelConfig, gpus: bool = True) -> str:
    """'8 GPUs, dp_shard 8, ep 8': the parallel degrees above 1, the schedule when pipelined."""
    degrees = {"dp_replicate": p.dp_replicate, "dp_shard": p.dp_shard, "ep": p.ep, "tp": p.tp, "pp": p.pp}
    parts = [f"{p.gpus} GPU" + ("s" if p.gpus > 1 else "")] if gpus else []
    parts += [f"{k} {v}" for k, v in degrees.items() if v > 1]
    if p.pp > 1:
        parts.append(p.pp_schedule)
    if p.dp > 1 and p.pp == 1 and not reshards_after_forward(p):  # a pipeline always keeps them
        parts.append("ZeRO-2")
    return ", ".join(parts) or "1 GPU"


def plan_sections(plans: list[Plan]) -> list[Section]:
    """The plan as titled tables, one column per plan: one layout for the terminal and for the docs."""

    def row(label: str, fn) -> tuple[str, list[str]]:
        return label, [fn(p) for p in plans]

    def n(x: int) -> str:
        return f"{x:,}"

    return [
        ("Parameters (exact; MTP apart, not in total)", [
            row("total", lambda p: n(p.params.total)),
            row("active per token", lambda p: n(p.params.active)),
            row("embedding (input table)", lambda p: n(p.params.embedding)),
            row("output head", lambda p: n(p.params.output_head) if p.params.output_head else "tied"),
            row("attention (MLA)", lambda p: n(p.params.attention)),
            row("dense FFN", lambda p: n(p.params.dense_ffn)),
            row("routed experts", lambda p: n(p.params.routed_experts)),
            row("routed experts, active", lambda p: n(p.params.routed_experts_active)),
            row("shared experts", lambda p: n(p.params.shared_experts)),
            row("router", lambda p: n(p.params.router)),
            row("norms", lambda p: n(p.params.norms)),
            row("MTP module", lambda p: n(p.params.mtp)),
            row("MTP module, active", lambda p: n(p.params.mtp_active)),
        ]),
        ("Training FLOPs per token", [
            row("sequence length", lambda p: f"{p.flops.seq_len:,}" + (" causal" if p.flops.causal else "")),
            row("6·N_active", lambda p: _si(p.flops.matmul, "FLOP")),
            row("attention 6·L·(s/2)·H·(d_qk+d_v)", lambda p: _si(p.flops.attention, "FLOP")),
            row("MTP", lambda p: _si(p.flops.mtp, "FLOP")),
            row("total", lambda p: _si(p.flops.total, "FLOP")),
        ]),
        ("KV cache per token (all layers)", [
            row("MLA latent, bf16", lambda p: human_bytes(p.kv_cache.mla_bf16)),
            row("MLA latent, fp8", lambda p: human_bytes(p.kv_cache.mla_fp8)),
            row("multi-head equivalent, bf16", lambda p: human_bytes(p.kv_cache.mha_bf16)),
            row("multi-head equivalent, fp8", lambda p: human_bytes(p.kv_cache.mha_fp8)),
            row("MLA saving", lambda p: f"{p.kv_cache.mha_bf16 / p.kv_cache.mla_bf16:.1f}x"),
        ]),
        ("Memory per GPU (the preset's layout, heaviest pipeline stage)", [
            row("layout", lambda p: describe_layout(p.parallel)),
            row("micro-batch x sequence", lambda p: f"{p.micro_batch_size} x {p.flops.seq_len:,}"),
            row("weights", lambda p: human_bytes(p.memory.weights)),
            row("gradients", lambda p: human_bytes(p.memory.gradients)),
            row("optimizer states", lambda p: human_bytes(p.memory.optimizer)),
            row("activations", lambda p: human_bytes(p.memory.activations)),
            row("activations, recomputed", lambda p: human_bytes(p.memory.activations_recompute)),
            row("activations, selective", lambda p: human_bytes(p.memory.activations_selective)),
            row("total", lambda p: human_bytes(p.memory.total) + _total_note(p.memory)),
            row(f"fits in {1 - HEADROOM:.0%} of", lambda p: f"{p.parallel.gpu_memory_gb:g} GB: "
                + ("yes" if p.memory.fits(p.parallel.gpu_memory_gb) else "NO")),
        ]),
        ("Chinchilla", [
            row("planned tokens", lambda p: human_count(p.chinchilla.tokens)),
            row(f"required ({plans[0].chinchilla.ratio_min:g} x active)" if plans else "required",
                lambda p: human_count(p.chinchilla.required_tokens)),
            row("tokens per active parameter", lambda p: f"{p.chinchilla.tokens_per_param:.1f}"),
            row("verdict", lambda p: p.chinchilla.verdict),
            row("peak lr (suggested)", lambda p: f"{p.suggested_lr:.1e}"),
            row("batch tokens (suggested)", lambda p: human_count(p.suggested_batch_tokens)),
        ]),
    ]


DOCS_COMMAND = "dsv3 plan --all --markdown > docs/scaling.md"

_CONVENTIONS = """\
## Conventions and formulas

All numbers come from `src/dsv3/scaling/` (params, memory, plan); `dsv3 plan --config X --json` prints them
exactly.

**Parameters.** Shapes are those of the Hugging Face DeepSeek-V3 modules, with no biases. Per block:
`input_layernorm` and `post_attention_layernorm` (hidden each); MLA: `q_a_proj` (hidden x q_lora_rank),
`q_a_layernorm`, `q_b_proj` (q_lora_rank x heads·qk_head_dim), or one `q_proj` when q_lora_rank is null;
`kv_a_proj_with_mqa` (hidden x (kv_lora_rank + qk_rope_head_dim)), `kv_a_layernorm`, `kv_b_proj`
(kv_lora_rank x heads·(qk_nope_head_dim + v_head_dim)), `o_proj` (heads·v_head_dim x hidden). Block i is MoE
iff `ModelConfig.is_moe_layer(i)`; a dense block has a SwiGLU MLP of width intermediate_size; an MoE block
has the router `gate.weight` (n_routed_experts x hidden; `e_score_correction_bias` is a buffer, not a
parameter), n_routed_experts SwiGLU experts of width moe_intermediate_size, and the shared experts as one
SwiGLU of width moe_intermediate_size·n_shared_experts. Then the final norm and `lm_head` (none when
`tie_word_embeddings`). "norms" counts every RMSNorm weight. The total equals
`sum(p.numel() for p in model.parameters())`, checked against transformers' `DeepseekV3ForCausalLM` on the
meta device in `tests/test_scaling.py`.

**MTP, listed apart.** Each of the num_nextn_predict_layers modules holds `enorm`, `hnorm` (hidden each),
`eh_proj` (2·hidden x hidden), one full block (MoE iff a block at index num_hidden_layers would be) and
`shared_head.norm`. It shares the main model's embedding and output head, so they are not counted again.
The published checkpoint stores its own copies of both in layer 61 (2 x 926,679,040 for DeepSeek-V3),
which is why 671B + MTP reads 685B there.

**Active per token.** Every parameter a token is multiplied through: everything but the input-embedding
table (a lookup, no FLOPs), with only num_experts_per_tok routed experts per MoE block; the router and the
shared experts count. With tied embeddings the table counts once, as the output head.

**Training FLOPs per token** (forward + backward, no recomputation; the MFU numerator):
`6·N_active + 6·L·s_eff·H·(qk_head_dim + v_head_dim)`, where the second term is the QK^T and AV products
and s_eff = s/2 under causal masking (the mean number of keys a query sees; `causal=False` gives s).
Each MTP depth adds `6·(its active parameters + vocab·hidden for the shared head)` plus its own attention
term; the total includes it, `FlopBreakdown.without_mtp` leaves it out.
Call `training_flops_per_token(cfg, seq_len, causal=True)`.

**KV cache per token** over the num_hidden_layers main blocks (MTP only drafts and is not cached). MLA caches
the compressed latent and the shared RoPE key: kv_lora_rank + qk_rope_head_dim values per layer. The
equivalent multi-head cache holds heads·(qk_head_dim + v_head_dim) values per layer. bf16 is 2 bytes per
value; fp8 is 1 byte per value plus one fp32 scale per token per layer.

**Memory per GPU** for a layout, on the heaviest pipeline stage:
- AdamW with FSDP2 mixed precision (torchtitan's recipe): fp32 master weights, fp32 gradients, fp32 m and
  v: 16 bytes per parameter, sharded over dp_shard. Routed experts are split over ep ranks (then FSDP over
  dp_shard/ep), matrices over tp (norms and router replicated), blocks over pp stages (even split, the
  first stage also holds the embedding, the last the final norm, head and MTP).
- Compute copies in bf16: with dp_shard > 1, the gathered weights of the largest FSDP unit twice (current
  and prefetched) and its fp32 unsharded gradient; on one replica, autocast's bf16 copy of every weight.
- Activations, bf16, adapted from Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
  Transformer Models") to MLA + SwiGLU/MoE with a flash-attention kernel (no s x s scores, no dropout):
  per token per block, 2 bytes x [2·hidden (norm in/out) + 2·q_lora_rank + (kv_lora_rank + qk_rope_head_dim)
  + kv_lora_rank + heads·(2·qk_head_dim + 2·v_head_dim) (q, k, v, attention output) + 2·hidden (second
  norm) + FFN], FFN = 4·intermediate_size dense, or num_experts_per_tok·(2·hidden + 4·moe_intermediate_size)
  + 4·moe_intermediate_size·n_shared_experts for MoE, plus fp32 softmax statistics (4·heads) and router
  scores (4·n_routed_experts). The last stage adds bf16 logits and their fp32 copy (6·vocab bytes per token)
  for the head and again per MTP depth. Activations are divided by tp (sequence parallelism assumed).
- With recomputation each block keeps only its input (2·hidden bytes per token) and one block is rebuilt at
  a time. Pipeline schedules hold several micro-batches: 1F1B min(pp - stage, micro-batches) on a stage,
  interleaved 1F1B that many times 1 + (pp-1)/(2·pp) (two virtual stages per rank), DualPipe pp + 1
  on every rank and two copies of the parameters (DeepSeek-V3 report, Table 2).
- A layout fits when the total stays under 90% of the GPU's memory (GB here means GiB).

**Chinchilla.** Hoffmann et al. 2022 find compute-optimal training at about 20 tokens per parameter; dsv3
accepts 20-26. For an MoE the parameter count is N_active, since compute per token follows it. Planned
tokens are steps x global_batch_size x seq_len; `dsv3 validate-chinchilla --strict` holds every preset to
the range. Suggested peak LR and batch come from DeepSeek LLM's fits on dense models (Bi et al. 2024):
lr = 0.3118·C^-0.125, batch tokens = 0.2920·C^0.3271, with C the training FLOPs (without MTP) of the
Chinchilla budget; the presets' train sections round them.

**Config selection** (`dsv3 select-config --gpus N --gpu-memory GB [--hours H] [--mfu M]`): for each preset,
FSDP over every data-parallel rank, experts over the GPUs of a node first; the first layout that fits wins,
trying no recomputation before recomputation, then fewest pipeline stages, fewest tensor ranks, largest
micro-batch, and for each layout FSDP keeping its gathered weights for the backward (ZeRO-2: no second
all-gather; measured 7-12% faster on 2 GPUs) before resharding them after the forward (ZeRO-3).
Time = the Chinchilla budget's training FLOPs / (GPUs x peak x MFU), x 4/3 with
recomputation (it repeats the forward). Those that fit (and finish within --hours) rank first, the largest
active model first.
"""


def markdown_report(plans: list[Plan]) -> str:
    """docs/scaling.md: a summary of every plan, the full tables, then the conventions behind them."""
    lines = [
        "# Scaling: parameters, FLOPs, KV cache, memory and Chinchilla budgets of the presets",
        "",
        f"Generated by `{DOCS_COMMAND}` (or `make docs`). Do not edit by hand:",
        "`tests/test_scaling.py` fails when this file and the command's output differ.",
        "",
        "| preset | total params | active params | KV cache/token (MLA bf16) | memory/GPU (layout) "
        "| Chinchilla tokens | planned tokens |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for p in plans:
        chin = p.chinchilla
        cells = [
            p.name,
            human_count(p.params.total),
            human_count(p.params.active),
            human_bytes(p.kv_cache.mla_bf16),
            f"{human_bytes(p.memory.total)} ({describe_layout(p.parallel)})",
            human_count(chin.required_tokens),
            f"{human_count(chin.tokens)} ({chin.tokens_per_param:.1f}/param)",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for title, rows in plan_sections(plans):
        lines += ["", f"## {title}", "", "| | " + " | ".join(p.name for p in plans) + " |",
                  "|---|" + "---:|" * len(plans)]
        lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    return "\n".join(lines) + "\n\n" + _CONVENTIONS


def _total_note(memory) -> str:
    """Which activations the total counts, and whether gradients overlap them (see MemoryEstimate)."""
    kind = {True: " (recompute)", "selective": " (selective recomputation)"}.get(memory.recompute, "")
    return kind + ("" if memory.gradients_in_forward else " (no accumulation)")
