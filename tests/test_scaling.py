"""Scaling accounting against transformers' DeepseekV3 (counts on the meta device, FLOPs by torch's
flop counter), the published DeepSeek-V3 figures, and the properties the memory model must have."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers

from dsv3.cli import main
from dsv3.config import (
    ModelConfig,
    ParallelConfig,
    TrainConfig,
    load_model_config,
    load_run_config,
    preset_names,
)
from dsv3.scaling import (
    HEADROOM,
    GiB,
    chinchilla_check,
    count_params,
    kv_cache_bytes_per_token,
    layout_problems,
    lr_and_batch_for_compute,
    memory_per_gpu,
    plan_run,
    rank_stages,
    select_configs,
    stage_units,
    training_flops_per_token,
    training_hours,
)
from dsv3.scaling.memory import (
    EAGER_ACTIVATION_FACTOR,
    EP_BUSIEST_RANK_ROUTED,
    estimate_memory,
    memory_profile,
)

ROOT = Path(__file__).resolve().parents[1]

# Variants that exercise every branch of the count: no query compression, tied head, 0 or 2 shared
# experts, no or several dense layers, no MTP. (transformers ignores moe_layer_freq, so it stays 1.)
VARIANTS = [
    [],
    ["q_lora_rank=null"],
    ["tie_word_embeddings=true"],
    ["n_shared_experts=0", "first_k_dense_replace=0"],
    ["n_shared_experts=2", "first_k_dense_replace=3"],
    ["num_nextn_predict_layers=0"],
]


def _hf(cfg: ModelConfig, **kwargs):
    return transformers.DeepseekV3Config(**cfg.to_hf_dict(), **kwargs)


def _meta_model(cfg: ModelConfig):
    with torch.device("meta"):
        return transformers.DeepseekV3ForCausalLM(_hf(cfg))


# --- parameters ------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: ",".join(o) or "tiny")
def test_counts_match_transformers_on_tiny_variants(overrides):
    cfg = load_model_config("tiny", overrides)
    model = _meta_model(cfg)
    counts = count_params(cfg)
    assert counts.total == sum(p.numel() for p in model.parameters())

    # Active, recounted from transformers' modules: all but the input table (unless tied, when it is
    # also the head), and k of the n routed experts.
    k_of_n = cfg.num_experts_per_tok / cfg.n_routed_experts
    active = 0.0
    for name, p in model.named_parameters():
        if name == "model.embed_tokens.weight" and not cfg.tie_word_embeddings:
            continue
        active += p.numel() * (k_of_n if ".mlp.experts." in name else 1)
    assert counts.active == active


@pytest.mark.parametrize("preset", ["small", "1b", "5b", "10b", "15b", "20b", "deepseek-v3"])
def test_preset_counts_match_transformers(preset):
    cfg = load_model_config(preset)
    assert count_params(cfg).total == sum(p.numel() for p in _meta_model(cfg).parameters())


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize(("preset", "overrides"), [
    *(("tiny", o) for o in VARIANTS),
    ("tiny", ["moe_layer_freq=2"]), ("small", []), ("20b", []), ("deepseek-v3", []),
], ids=lambda x: x if isinstance(x, str) else ",".join(x) or "-")
def test_counts_match_the_dsv3_model(preset, overrides):
    from dsv3.model import Transformer

    cfg = load_model_config(preset, overrides)
    with torch.device("meta"):
        model = Transformer(cfg)
    counts = count_params(cfg)
    assert counts.total_with_mtp == sum(p.numel() for p in model.parameters())
    assert counts.total == model.num_params()
    assert counts.mtp == sum(p.numel() for p in model.mtp.parameters())


@pytest.mark.parametrize("overrides", [[], ["first_k_dense_replace=4", "q_lora_rank=null"]])
def test_mtp_count_matches_transformers_modules(overrides):
    # The checkpoint's layer-61 layout built from transformers' own modules: enorm, hnorm, eh_proj,
    # one decoder block at index num_hidden_layers, shared_head.norm (embedding and head are shared).
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RMSNorm

    cfg = load_model_config("tiny", overrides)
    d = cfg.hidden_size
    with torch.device("meta"):
        mtp = torch.nn.ModuleDict({
            "enorm": DeepseekV3RMSNorm(d),
            "hnorm": DeepseekV3RMSNorm(d),
            "eh_proj": torch.nn.Linear(2 * d, d, bias=False),
            "block": DeepseekV3DecoderLayer(_hf(cfg), layer_idx=cfg.num_hidden_layers),
            "shared_head_norm": DeepseekV3RMSNorm(d),
        })
    assert count_params(cfg).mtp == sum(p.numel() for p in mtp.parameters())


def test_deepseek_v3_matches_published_figures():
    cfg = load_model_config("deepseek-v3")
    counts = count_params(cfg)
    assert counts.total == 671_026_404_352  # "671B total"
    assert 36e9 < counts.active < 38e9  # "37B activated for each token"
    # The HF checkpoint's 685B adds the MTP module with its own copies of the embedding and head.
    checkpoint = counts.total + counts.mtp + 2 * cfg.vocab_size * cfg.hidden_size
    assert abs(checkpoint / 1e9 - 685) < 1


def test_preset_headers_state_the_computed_counts():
    number = r"([\d,]+)"
    pattern = re.compile(rf"^# (\S+): {number} total / {number} active parameters \(\+{number} in the MTP")
    checked = 0
    for name in preset_names():
        first = (ROOT / "configs" / f"{name}.yaml").read_text().splitlines()[0]
        match = pattern.match(first)
        if not match:
            continue
        counts = count_params(load_model_config(name))
        assert match.group(1) == name
        stated = [int(g.replace(",", "")) for g in match.groups()[1:]]
        assert stated == [counts.total, counts.active, counts.mtp]
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize("name", ["1b", "5b", "10b", "15b", "20b"])
def test_ladder_totals_match_their_names(name):
    total = count_params(load_model_config(name)).total
    assert abs(total / (float(name[:-1]) * 1e9) - 1) < 0.05


# --- FLOPs and KV cache -----------------------------------------------------------------------


FLOP_VARIANTS = [[], ["q_lora_rank=null", "tie_word_embeddings=true", "n_shared_experts=2"]]


@pytest.mark.parametrize("overrides", FLOP_VARIANTS, ids=["tiny", "variant"])
def test_flops_match_torch_flop_counter_on_transformers(overrides):
    """Forward matmul FLOPs of transformers' model (eager experts, so every expert GEMM is seen) x 3."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = load_model_config("tiny", overrides)
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(_hf(cfg, experts_implementation="eager")).eval()
    batch, seq = 2, 48
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, cfg.vocab_size, (batch, seq)))
    ours = training_flops_per_token(cfg, seq, causal=False)  # eager attention computes the full s x s
    norms = count_params(cfg).norms  # 6N counts norm weights too; the counter sees only matmuls
    assert 3 * counter.get_total_flops() == (ours.without_mtp - 6 * norms) * batch * seq


def test_flop_formula_terms():
    cfg = load_model_config("small")
    causal = training_flops_per_token(cfg, 2048)
    full = training_flops_per_token(cfg, 2048, causal=False)
    counts = count_params(cfg)
    assert causal.matmul == 6 * counts.active
    assert causal.attention == 6 * 12 * 1024 * 16 * (96 + 64)  # 6·L·(s/2)·H·(d_qk + d_v)
    assert full.attention == 2 * causal.attention
    assert causal.mtp == 6 * (counts.mtp_active + 32768 * 1024) + 6 * 1 * 1024 * 16 * 160
    assert causal.total == causal.without_mtp + causal.mtp
    no_mtp = training_flops_per_token(load_model_config("small", ["num_nextn_predict_layers=0"]), 2048)
    assert no_mtp.mtp == 0 and no_mtp.total == causal.without_mtp


def test_kv_cache_deepseek_v3():
    kv = kv_cache_bytes_per_token(load_model_config("deepseek-v3"))
    assert kv.mla_bf16 == 61 * (512 + 64) * 2 == 70_272
    assert kv.mla_fp8 == 61 * (576 + 4)  # one byte a value, one fp32 scale per token per layer
    assert kv.mha_bf16 == 61 * 128 * (192 + 128) * 2
    assert kv.mha_bf16 / kv.mla_bf16 > 70


# --- memory --------------------------------------------------------------------------------


def _mem(name: str, train: dict | None = None, **layout):
    cfg = load_model_config(name)
    run = load_run_config(name)
    t = run.train.model_copy(update=train or {})
    return cfg, memory_per_gpu(cfg, t, ParallelConfig(**layout))


def test_single_gpu_states_are_exactly_12_16_or_18_bytes_per_parameter():
    cfg, mem = _mem("tiny", gpus=1)  # param_dtype and optimizer_state_dtype auto: bf16 on one GPU
    n = count_params(cfg).total_with_mtp
    # bf16 weight + fp32 master, bf16 gradient, bf16 Adam m and v
    assert (mem.weights, mem.gradients, mem.optimizer) == (6 * n, 2 * n, 4 * n)
    _, moments = _mem("tiny", {"optimizer_state_dtype": "float32"}, gpus=1)
    assert (moments.weights, moments.gradients, moments.optimizer) == (6 * n, 2 * n, 8 * n)
    _, fp32 = _mem("tiny", {"param_dtype": "float32"}, gpus=1)
    # fp32 weight + bf16 autocast copy, fp32 gradient, fp32 Adam m and v
    assert (fp32.weights, fp32.gradients, fp32.optimizer) == (6 * n, 4 * n, 8 * n)
    _, two = _mem("tiny", gpus=2, dp_shard=2)  # FSDP: float32 shards and gradients whatever auto says
    _, two_fp32 = _mem("tiny", {"param_dtype": "float32"}, gpus=2, dp_shard=2)
    assert two.gradients == two_fp32.gradients


def test_fsdp_shards_states_and_recompute_saves_activations():
    _, one = _mem("small", {"param_dtype": "float32"}, gpus=1)  # the states FSDP shards
    _, eight = _mem("small", gpus=8, dp_shard=8, ep=8)
    assert eight.optimizer == pytest.approx(one.optimizer / 8, rel=1e-6)
    assert eight.weights < one.weights / 4 and eight.gradients < one.gradients / 4
    assert eight.activations_recompute < eight.activations
    _, rc = _mem("small", {"activation_checkpointing": True}, gpus=8, dp_shard=8, ep=8)
    assert rc.active_activations == eight.activations_recompute
    assert eight.active_activations == eight.activations > rc.active_activations
    assert rc.total < eight.total


def test_selective_recomputation_keeps_between_full_recomputation_and_none():
    _, none = _mem("small", {"micro_batch_size": 4, "global_batch_size": 8}, gpus=1)
    _, full = _mem("small", {"micro_batch_size": 4, "global_batch_size": 8, "activation_checkpointing": True},
                   gpus=1)
    _, sel = _mem("small", {"micro_batch_size": 4, "global_batch_size": 8,
                            "activation_checkpointing": "selective"}, gpus=1)
    assert full.active_activations < sel.active_activations < none.active_activations
    assert full.total < sel.total < none.total
    assert sel.activations_selective == none.activations_selective  # the same profile, another choice


def test_all_gather_expert_dispatch_keeps_the_routed_rows_of_every_ep_rank():
    """The all-gather dispatch keeps ep ranks' routed rows (fixed buffers); the all-to-all keeps the rows
    its experts received, budgeted at the busiest rank's share (EP_BUSIEST_RANK_ROUTED)."""
    batch = {"micro_batch_size": 4, "global_batch_size": 8, "seq_len": 1024, "compile": True}
    cfg, a2a = _mem("small", batch, gpus=2, dp_shard=2, ep=2)
    _, gathered = _mem("small", batch, gpus=2, dp_shard=2, ep=2, ep_dispatch="all_gather")
    _, dense_only = _mem("small", batch, gpus=2, dp_shard=2)  # FSDP: every expert's rows are local
    routed = sum(a.routed for a in memory_profile(cfg).acts)  # bytes a token, every MoE block and MTP
    tokens = 4 * 1024
    assert routed > 0 and gathered.activations - a2a.activations == pytest.approx(
        (2 - EP_BUSIEST_RANK_ROUTED) * routed * tokens, rel=1e-6)
    assert a2a.activations - dense_only.activations == pytest.approx(
        (EP_BUSIEST_RANK_ROUTED - 1) * routed * tokens, rel=1e-6)


def test_chunked_losses_drop_every_heads_logits_but_one_chunk_and_hold_the_heads_gradients():
    batch = {"micro_batch_size": 4, "global_batch_size": 8, "seq_len": 1024, "compile": True}
    cfg, whole = _mem("small", batch, gpus=1)
    _, chunked = _mem("small", {**batch, "loss_chunk_tokens": 512}, gpus=1)
    logits = memory_profile(cfg).logits  # bytes a token, one head
    heads = 1 + cfg.num_nextn_predict_layers
    assert logits == 6 * cfg.vocab_size
    # each head's loss holds its weights' float32 gradient from the forward on (vocab x hidden, the norm)
    held = heads * 4 * memory_profile(cfg).head.local(1)
    assert held >= heads * 4 * cfg.vocab_size * cfg.hidden_size
    assert whole.activations - chunked.activations == heads * logits * 4 * 1024 - 2 * logits * 512 - held


def test_an_eager_step_keeps_more_activations_than_a_compiled_one():
    _, compiled = _mem("small", {"compile": True}, gpus=1)
    _, eager = _mem("small", {"compile": False}, gpus=1)
    assert eager.activations == pytest.approx(EAGER_ACTIVATION_FACTOR * compiled.activations, rel=1e-6)
    assert (eager.weights, eager.gradients, eager.optimizer) == (
        compiled.weights, compiled.gradients, compiled.optimizer)


def test_gradients_overlap_activations_only_when_they_accumulate():
    """One micro-batch: gradients are made as activations are freed (peak: the larger of the two);
    accumulation keeps every gradient through the next micro-batches' forwards (peak: the sum)."""
    _, one = _mem("small", {"micro_batch_size": 8, "global_batch_size": 8}, gpus=1)
    _, two = _mem("small", {"micro_batch_size": 8, "global_batch_size": 16}, gpus=1)
    assert not one.gradients_in_forward and two.gradients_in_forward
    assert one.total == one.weights + one.optimizer + max(one.gradients, one.activations)
    assert two.total == two.weights + two.optimizer + two.gradients + two.activations


def test_activations_scale_with_micro_batch_and_tp_splits_heads_and_ffn_widths():
    cfg, m4 = _mem("5b", {"micro_batch_size": 4, "compile": True}, gpus=8, dp_shard=8)
    _, m2 = _mem("5b", {"micro_batch_size": 2, "compile": True}, gpus=8, dp_shard=8)
    _, tp2 = _mem("5b", {"micro_batch_size": 4, "compile": True}, gpus=8, dp_shard=4, tp=2)
    assert m4.activations == pytest.approx(2 * m2.activations, rel=1e-6)
    # tp halves the per-head tensors and the dense/shared FFN widths; routed experts and norms stay whole
    prof = memory_profile(cfg)
    split = sum(a.split for a in prof.acts) * 4 * 4096
    assert m4.activations - tp2.activations == pytest.approx(split / 2, rel=1e-6)
    assert m4.activations / 2 < tp2.activations < m4.activations


def test_pipeline_stages_hold_fewer_parameters_but_more_micro_batches():
    _, flat = _mem("10b", gpus=8, dp_shard=8, ep=8)
    _, piped = _mem("10b", gpus=16, dp_shard=8, pp=2, ep=8)
    assert piped.optimizer < 0.6 * flat.optimizer  # about half the blocks per rank
    assert piped.micro_batches_in_flight == 2  # the first 1F1B stage holds pp micro-batches
    _, dual = _mem("10b", gpus=16, dp_shard=8, pp=2, ep=8, pp_schedule="DualPipeV")
    # DualPipeV: pp + 1 half-rank chunks in flight, and one copy of the weights (DualPipe kept two)
    assert dual.micro_batches_in_flight == 2.5
    assert dual.optimizer == pytest.approx(piped.optimizer, rel=0.05)


def test_every_preset_layout_is_one_dsv3_train_runs():
    for name in preset_names():
        run = load_run_config(name)
        assert layout_problems(run.model, run.train, run.parallel, ranks_per_node=8) == [], name


def test_layout_problems_name_the_keys():
    run = load_run_config("small")
    def problems(**layout):
        return " ".join(layout_problems(run.model, run.train, ParallelConfig(**layout)))
    assert "parallel.ep=3 must divide model.n_routed_experts=64" in problems(gpus=3, dp_shard=3, ep=3)
    assert "tp=2 combines with FSDP" in problems(gpus=4, dp_shard=2, tp=2, ep=2)
    v8 = problems(gpus=8, pp=8, pp_schedule="DualPipeV")
    assert "pp=8 with DualPipeV cuts 16 stages from 13 blocks" in v8
    # 256 sequences / (8 per micro-batch x 16 dp ranks) = 2 micro-batches; DualPipeV over pp=2 needs 4
    assert "2 micro-batches per step" in problems(gpus=32, dp_shard=16, pp=2, pp_schedule="DualPipeV")
    assert "cpu_offload needs FSDP" in problems(gpus=1, cpu_offload=True)
    assert "fsdp_unit_blocks=2 with pp=2" in problems(gpus=2, pp=2, fsdp_unit_blocks=2)
    whole = run.train.model_copy(update={"compile": "model"})
    refused = layout_problems(run.model, whole, ParallelConfig(gpus=2, dp_shard=2))
    assert "train.compile=model" in " ".join(refused)
    assert layout_problems(run.model, whole, ParallelConfig(gpus=1)) == []
    fp8 = run.train.model_copy(update={"fp8": True})
    tp_fp8 = layout_problems(run.model, fp8, ParallelConfig(gpus=2, tp=2))
    assert "train.fp8 with parallel.tp=2" in " ".join(tp_fp8)
    assert layout_problems(run.model, fp8, ParallelConfig(gpus=2, dp_shard=2, ep=2)) == []
    bf16 = run.train.model_copy(update={"param_dtype": "bfloat16"})
    fsdp_bf16 = layout_problems(run.model, bf16, ParallelConfig(gpus=2, dp_shard=2))
    assert "train.param_dtype=bfloat16" in " ".join(fsdp_bf16)
    assert layout_problems(run.model, bf16, ParallelConfig(gpus=1)) == []
    assert problems(gpus=2, dp_shard=2, ep=2) == ""


def test_larger_fsdp_units_gather_more_weights_at_a_time():
    """The estimate holds two gathered units (current and prefetched): a unit of 2 blocks adds one
    block's bf16 weights twice (its unsharded gradient peaks apart, while activations are freed)."""
    run = load_run_config("small")
    prof = memory_profile(run.model)
    def total(k: int) -> float:
        layout = ParallelConfig(gpus=8, dp_shard=8, fsdp_unit_blocks=k)  # a block outweighs the head
        return estimate_memory(prof, layout, seq_len=2048, micro_batch=8, n_micro=1, recompute=False).total
    block = prof.units[prof.n_blocks - 1].gathered(1, 1)  # a MoE block's parameters
    assert total(2) - total(1) == pytest.approx(block * 2 * 2, rel=0.05)
    assert total(13) > total(4) > total(2)


def test_gradients_reduced_at_the_last_micro_batch_are_held_unsharded_meanwhile():
    """`grad_sync: last_micro_batch` keeps every parameter's fp32 gradient unsharded between
    micro-batches (instead of one unit's at a time); with one micro-batch a step nothing changes."""
    run = load_run_config("small")
    prof = memory_profile(run.model)

    def grads(sync: str, n_micro: int) -> int:
        layout = ParallelConfig(gpus=2, dp_shard=2, fsdp_unit_blocks=4, grad_sync=sync)
        return estimate_memory(prof, layout, seq_len=2048, micro_batch=8, n_micro=n_micro,
                               recompute=False).gradients
    every, last = grads("every_micro_batch", 2), grads("last_micro_batch", 2)
    assert grads("last_micro_batch", 1) == grads("every_micro_batch", 1) == every
    whole = sum(u.gathered(1, 1) for u in [*prof.units, prof.embedding, prof.head])
    four_blocks = sum(u.gathered(1, 1) for u in prof.units[prof.n_blocks - 4 : prof.n_blocks])
    assert last - every == pytest.approx(4 * (whole - four_blocks), rel=0.05)


def test_pipeline_units_cut_evenly_and_v_schedules_fold_the_stages():
    assert stage_units(5, 4) == [range(0, 2), range(2, 3), range(3, 4), range(4, 5)]
    v = ParallelConfig(gpus=2, pp=2, pp_schedule="DualPipeV")
    loop = ParallelConfig(gpus=2, pp=2, pp_schedule="interleaved1F1B")
    assert [rank_stages(r, v) for r in (0, 1)] == [[0, 3], [1, 2]]
    assert [rank_stages(r, loop) for r in (0, 1)] == [[0, 2], [1, 3]]


def test_every_preset_layout_fits_and_plans_chinchilla_tokens():
    for name in preset_names():
        plan = plan_run(load_run_config(name))
        assert plan.memory.fits(plan.parallel.gpu_memory_gb), name
        assert plan.chinchilla.compliant, (name, plan.chinchilla.tokens_per_param)


# --- Chinchilla, hyper-parameters, time -----------------------------------------------------


def test_chinchilla_verdicts():
    cfg = load_model_config("tiny")
    active = count_params(cfg).active
    per_step = 32 * 256

    def verdict(steps: int) -> str:
        return chinchilla_check(cfg, TrainConfig(steps=steps, global_batch_size=32, micro_batch_size=32,
                                                 seq_len=256)).verdict

    assert verdict(-(-20 * active // per_step)) == "compliant"  # just over 20 tokens per parameter
    assert verdict(20 * active // per_step - 1) == "under-trained"
    assert verdict(26 * active // per_step + 2) == "over-trained"
    with pytest.raises(ValueError):
        chinchilla_check(cfg, TrainConfig(), ratio_min=30, ratio_max=20)


def test_lr_and_batch_law_reproduces_deepseek_scale():
    lr, batch = lr_and_batch_for_compute(3e24)  # DeepSeek-V3-scale compute
    assert 1e-4 < lr < 5e-4 and 5e6 < batch < 1e8
    small_lr, small_batch = lr_and_batch_for_compute(1e19)
    assert small_lr > lr and small_batch < batch


def test_training_hours():
    assert training_hours(989e12 * 0.5 * 3600, gpus=1, mfu=0.5) == pytest.approx(1.0)
    assert training_hours(989e12 * 3600, gpus=2, mfu=1.0, recompute=True) == pytest.approx(2 / 3)


# --- config selection ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def presets():
    return [load_run_config(name) for name in preset_names()]


def _by_name(choices):
    return {c.name: c for c in choices}


def _assert_ranked_for_a_reason(choices, gpu_memory_gb, hours=None):
    """Why a ranking is right: the fitting configs come first, the most active parameters (compute per
    token) first, each within the usable memory and the time budget; every other config names what it
    lacks, and none that fits has more active parameters than the leader."""
    fitting = [c for c in choices if c.fits]
    assert choices[: len(fitting)] == fitting
    assert [c.active_params for c in fitting] == sorted((c.active_params for c in fitting), reverse=True)
    for c in fitting:
        assert c.memory.total <= gpu_memory_gb * GiB * (1 - HEADROOM)
        assert hours is None or c.hours <= hours
    for c in choices[len(fitting):]:
        assert c.reason


def test_select_one_24gb_gpu(presets):
    choices = select_configs(presets, gpus=1, gpu_memory_gb=24)
    _assert_ranked_for_a_reason(choices, 24)
    by_name = _by_name(choices)
    # 1b leads; small (1% fewer active parameters, 22% more in total) fits too, at 12 bytes a parameter
    # (one GPU trains bf16 weights, gradients and moments beside float32 masters); 5b and up do not.
    assert choices[0].name == "1b"
    assert by_name["small"].fits and by_name["small"].memory.total < 24 * 2**30
    assert "GiB per GPU" in by_name["5b"].reason


def test_select_one_node_of_80gb(presets):
    choices = select_configs(presets, gpus=8, gpu_memory_gb=80)
    _assert_ranked_for_a_reason(choices, 80)
    assert choices[0].name == "20b"  # the largest preset but deepseek-v3, which needs far more memory
    v3 = _by_name(choices)["deepseek-v3"]
    assert not v3.fits and "GiB per GPU" in v3.reason
    timed = select_configs(presets, gpus=8, gpu_memory_gb=80, hours=24)
    _assert_ranked_for_a_reason(timed, 80, hours=24)
    for name in ("10b", "15b", "20b"):  # too slow, not too big: they fit without the time budget
        assert not _by_name(timed)[name].fits and "h budget" in _by_name(timed)[name].reason
        assert _by_name(choices)[name].fits and _by_name(choices)[name].hours > 24


def test_select_2048_gpus(presets):
    ranked = select_configs(presets, gpus=2048, gpu_memory_gb=80)
    _assert_ranked_for_a_reason(ranked, 80)
    best, choices = ranked[0], _by_name(ranked)
    assert best.name == "deepseek-v3"  # the largest preset, and it fits
    layout = best.parallel
    assert layout.dp_shard * layout.tp * layout.pp == 2048
    assert 40 < best.hours < 120  # ~730B tokens: DeepSeek-V3 took ~180k GPU-hours per trillion tokens
    assert "global batch" in choices["tiny"].reason  # 32 sequences cannot feed 2048 GPUs


def test_select_keeps_fsdp_weights_for_backward_where_they_fit(presets):
    """ZeRO-2 (no second all-gather: faster on GPUs) where memory allows, else the same layout resharded."""
    small = next(r for r in presets if r.name == "small")
    roomy = select_configs([small], gpus=2, gpu_memory_gb=80)[0]
    assert roomy.fits and roomy.parallel.reshard_after_forward is False
    resharded = roomy.parallel.model_copy(update={"reshard_after_forward": None})
    zero3 = estimate_memory(memory_profile(small.model), resharded, seq_len=small.train.seq_len,
                            micro_batch=roomy.micro_batch_size, n_micro=small.train.global_batch_size
                            // (roomy.micro_batch_size * 2), recompute=False, eager=not small.train.compile)
    assert zero3.total < roomy.memory.total  # a gathered block fewer
    budget = (zero3.total + roomy.memory.total) / 2 / GiB / (1 - HEADROOM)  # between the two
    tight = select_configs([small], gpus=2, gpu_memory_gb=budget)[0]
    assert tight.fits and tight.parallel.reshard_after_forward is None and not tight.recompute
    assert tight.parallel.ep == roomy.parallel.ep and tight.micro_batch_size == roomy.micro_batch_size


def test_select_rejects_bad_budget(presets):
    with pytest.raises(ValueError):
        select_configs(presets, gpus=0, gpu_memory_gb=80)


# --- the docs page ---------------------------------------------------------------------------


def test_docs_scaling_md_is_what_dsv3_plan_generates(capsys):
    assert main(["plan", "--all", "--markdown"]) == 0
    generated = capsys.readouterr().out
    committed = (ROOT / "docs" / "scaling.md").read_text(encoding="utf-8")
    assert committed == generated, "docs/scaling.md is stale: run `make docs`"
    for name in preset_names():
        assert f"| {name} |" in generated


def test_node_limited_routing_reaches_at_most_max_nodes_per_token():
    """DeepSeek-V3 limits nodes through expert groups: when each group lies on one node, a token's experts
    (from topk_group groups) lie on at most topk_group nodes. Checked on the router's own choices."""
    from dsv3.model.moe import route
    from dsv3.scaling.layout import expert_nodes
    from tests.conftest import base_config

    # 16 experts in 4 groups, on 8 expert-parallel ranks of 2-GPU nodes: each node holds one group.
    model = base_config(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    layout = ParallelConfig(gpus=8, dp_shard=8, ep=8, max_nodes_per_token=2)
    batch = TrainConfig(global_batch_size=8, micro_batch_size=1)
    assert layout_problems(model, batch, layout, ranks_per_node=2) == []
    node = torch.tensor(expert_nodes(16, layout, ranks_per_node=2, first_rank=0))
    assert node.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    gen = torch.Generator().manual_seed(0)
    _, _, chosen = route(torch.randn(4096, 16, generator=gen), 0.3 * torch.randn(16, generator=gen), 4, 4, 2)
    reached = torch.tensor([len(set(row)) for row in node[chosen].tolist()])
    assert reached.max() == 2  # some tokens use two nodes, none more
    # Refused when routing could break the limit: more groups per token, or groups across nodes.
    wide = " ".join(layout_problems(model.model_copy(update={"topk_group": 3}), batch, layout, 2))
    assert "topk_group=3 lets a token reach 3 of the 4 nodes" in wide
    straddling = base_config(n_routed_experts=16, n_group=2, topk_group=1, num_experts_per_tok=4)
    assert "expert group 0 straddles two" in " ".join(layout_problems(straddling, batch, layout, 2))
    assert layout_problems(straddling, batch, layout, ranks_per_node=8) == []  # one node: nothing to limit


def test_old_schedule_name_and_experts_beyond_the_fsdp_ranks_are_one_line_errors():
    from dsv3.config import ConfigError, load_run_config

    with pytest.raises(ConfigError, match="'dualpipe' is now 'DualPipeV'"):
        load_run_config("deepseek-v3", ["parallel.pp_schedule=dualpipe"])
    with pytest.raises(ConfigError, match=r"ep \(4\) must divide dp_shard \(2\)"):
        load_run_config("small", ["parallel.gpus=4", "parallel.dp_replicate=2", "parallel.dp_shard=2",
                                  "parallel.ep=4"])
    with pytest.raises(ConfigError, match=r"ep_chunks \(2\) splits the all_gather dispatch: .*ep_dispatch "
                                          "all_to_all"):
        load_run_config("small", ["parallel.gpus=2", "parallel.dp_shard=2", "parallel.ep=2",
                                  "parallel.ep_chunks=2"])
    ep2 = ["parallel.gpus=2", "parallel.dp_shard=2", "parallel.ep=2"]
    assert load_run_config("small", [*ep2, "parallel.ep_dispatch=all_gather"]).parallel.expert_chunks == 2
    assert load_run_config("small", ep2).parallel.expert_chunks == 1  # all-to-all: one piece


def test_bfloat16_moments_halve_the_optimizer_state_in_the_estimate():
    run = load_run_config("small")
    layout = ParallelConfig(gpus=2, dp_shard=2)
    full = memory_per_gpu(run.model, run.train, layout)  # auto: float32 moments under FSDP
    moments = run.train.model_copy(update={"optimizer_state_dtype": "bfloat16"})
    bf16 = memory_per_gpu(run.model, moments, layout)
    assert bf16.optimizer * 2 == full.optimizer > 0
    assert full.total - bf16.total == full.optimizer - bf16.optimizer
