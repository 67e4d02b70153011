"""Budgets: Chinchilla tokens, learning rate and batch for the compute, wall-clock time, and the choice
of a preset and layout for a GPU budget."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from dsv3.config import ModelConfig, ParallelConfig, RunConfig, TrainConfig
from dsv3.scaling.hardware import DEFAULT_GPU, PEAK_BF16_TFLOPS
from dsv3.scaling.layout import layout_problems
from dsv3.scaling.memory import (
    HEADROOM,
    GiB,
    KVCacheBytes,
    MemoryEstimate,
    estimate_memory,
    grad_bytes_for,
    kv_cache_bytes_per_token,
    memory_per_gpu,
    memory_profile,
    optimizer_bytes_for,
)
from dsv3.scaling.params import FlopBreakdown, ParamCounts, count_params, training_flops_per_token

__all__ = [
    "CHINCHILLA_MIN",
    "CHINCHILLA_MAX",
    "DEFAULT_PEAK_TFLOPS",
    "ChinchillaCheck",
    "Plan",
    "Choice",
    "chinchilla_check",
    "lr_and_batch_for_compute",
    "plan_run",
    "training_hours",
    "select_configs",
]

# Hoffmann et al. 2022's compute-optimal range of training tokens per (active) parameter.
CHINCHILLA_MIN, CHINCHILLA_MAX = 20.0, 26.0
DEFAULT_PEAK_TFLOPS = PEAK_BF16_TFLOPS[DEFAULT_GPU]
RECOMPUTE_SLOWDOWN = 4 / 3  # full recomputation repeats the forward: 4 passes of work instead of 3


@dataclass(frozen=True)
class ChinchillaCheck:
    """Planned tokens vs Hoffmann et al. 2022's compute-optimal 20-26 tokens per (active) parameter."""

    active_params: int
    tokens: int  # steps x global_batch_size x seq_len
    ratio_min: float
    ratio_max: float

    @property
    def required_tokens(self) -> int:
        return math.ceil(self.ratio_min * self.active_params)

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.active_params

    @property
    def verdict(self) -> str:
        r = self.tokens_per_param
        if r < self.ratio_min:
            return "under-trained"
        return "over-trained" if r > self.ratio_max else "compliant"

    @property
    def compliant(self) -> bool:
        return self.verdict == "compliant"

    def as_dict(self) -> dict[str, Any]:
        extra = ("required_tokens", "tokens_per_param", "verdict", "compliant")
        return {**asdict(self), **{p: getattr(self, p) for p in extra}}


def chinchilla_check(
    cfg: ModelConfig,
    train: TrainConfig,
    ratio_min: float = CHINCHILLA_MIN,
    ratio_max: float = CHINCHILLA_MAX,
) -> ChinchillaCheck:
    """For an MoE the parameter count is N_active: compute per token follows active, not total, size."""
    if not 0 < ratio_min <= ratio_max:
        raise ValueError(f"need 0 < ratio_min <= ratio_max, got {ratio_min} and {ratio_max}")
    return ChinchillaCheck(count_params(cfg).active, train.total_tokens, ratio_min, ratio_max)


def lr_and_batch_for_compute(flops: float) -> tuple[float, float]:
    """Peak LR and batch size in tokens from DeepSeek LLM's fits (Bi et al. 2024, eq. 1).

    eta = 0.3118·C^-0.125 and B = 0.2920·C^0.3271, C the training FLOPs; fitted on dense models, used
    here with the active-parameter FLOPs of the MoE.
    """
    return 0.3118 * flops**-0.125, 0.2920 * flops**0.3271




@dataclass(frozen=True)
class Plan:
    """Everything `dsv3 plan` reports for one run config."""

    name: str
    params: ParamCounts
    flops: FlopBreakdown
    kv_cache: KVCacheBytes
    memory: MemoryEstimate
    chinchilla: ChinchillaCheck
    parallel: ParallelConfig
    micro_batch_size: int
    suggested_lr: float
    suggested_batch_tokens: float
    problems: list[str]  # why `dsv3 train` cannot run this layout (empty: it can)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "params": self.params.as_dict(),
            "flops_per_token": self.flops.as_dict(),
            "kv_cache_bytes_per_token": self.kv_cache.as_dict(),
            "memory_per_gpu": {
                **self.memory.as_dict(),
                "gpu_memory_gb": self.parallel.gpu_memory_gb,
                "fits": self.memory.fits(self.parallel.gpu_memory_gb),
            },
            "parallel": self.parallel.model_dump(),
            "layout_problems": self.problems,
            "micro_batch_size": self.micro_batch_size,
            "chinchilla": self.chinchilla.as_dict(),
            "suggested": {"lr": self.suggested_lr, "batch_tokens": self.suggested_batch_tokens},
        }


def plan_run(
    run: RunConfig, ratio_min: float = CHINCHILLA_MIN, ratio_max: float = CHINCHILLA_MAX, causal: bool = True
) -> Plan:
    """Counts, FLOPs, KV cache, memory for the run's own layout, and its Chinchilla check."""
    flops = training_flops_per_token(run.model, run.train.seq_len, causal)
    chin = chinchilla_check(run.model, run.train, ratio_min, ratio_max)
    lr, batch = lr_and_batch_for_compute(flops.without_mtp * chin.required_tokens)
    return Plan(
        name=run.name,
        params=count_params(run.model),
        flops=flops,
        kv_cache=kv_cache_bytes_per_token(run.model),
        memory=memory_per_gpu(run.model, run.train, run.parallel),
        chinchilla=chin,
        parallel=run.parallel,
        micro_batch_size=run.train.micro_batch_size,
        suggested_lr=lr,
        suggested_batch_tokens=batch,
        problems=layout_problems(run.model, run.train, run.parallel),
    )


def training_hours(
    flops: float, gpus: int, mfu: float, peak_tflops: float = DEFAULT_PEAK_TFLOPS, recompute: bool = False
) -> float:
    """Wall-clock hours for `flops` model FLOPs; recomputation's extra forward lowers the useful rate."""
    seconds = flops / (gpus * peak_tflops * 1e12 * mfu)
    return seconds * (RECOMPUTE_SLOWDOWN if recompute else 1.0) / 3600


@dataclass(frozen=True)
class Choice:
    """One config judged for a GPU budget: its layout and costs when it fits, else why not."""

    name: str
    total_params: int
    active_params: int
    tokens: int  # the Chinchilla budget: ratio x N_active
    flops: float  # training FLOPs for those tokens
    fits: bool
    reason: str = ""
    parallel: ParallelConfig | None = None
    micro_batch_size: int | None = None
    memory: MemoryEstimate | None = None
    hours: float | None = None
    recompute: bool = False  # fits only with activation checkpointing (train.activation_checkpointing)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "fits": self.fits, "reason": self.reason,
            "total_params": self.total_params, "active_params": self.active_params,
            "tokens": self.tokens, "flops": self.flops, "hours": self.hours,
            "micro_batch_size": self.micro_batch_size, "activation_checkpointing": self.recompute,
            "parallel": None if self.parallel is None else self.parallel.model_dump(),
            "memory_per_gpu": None if self.memory is None else self.memory.as_dict(),
        }


def _pow2_divisors(n: int, limit: int) -> list[int]:
    return [x for x in (2**i for i in range(n.bit_length())) if n % x == 0 and x <= limit]


def _layouts(cfg: ModelConfig, train: TrainConfig, gpus: int, gpus_per_node: int):
    """Candidate layouts `dsv3 train` runs (`layout_problems` is empty), simplest first: fewest pipeline
    stages, then tensor ranks, larger micro-batches.

    FSDP shards over every data-parallel rank (dp_shard = dp). Experts go over the node's GPUs first
    (all-to-all on NVLink, and FSDP no longer gathers whole expert sets), wider only when memory asks.
    Tensor parallelism runs with FSDP alone (ep = pp = 1).
    """
    mbs_options = [m for m in range(train.micro_batch_size, 0, -1) if train.micro_batch_size % m == 0]
    for pp in [p for p in range(1, gpus + 1) if gpus % p == 0 and p <= cfg.num_hidden_layers]:
        for tp in _pow2_divisors(gpus // pp, gpus_per_node):
            if tp > 1 and pp > 1:
                continue
            dp = gpus // (pp * tp)
            eps = [e for e in _pow2_divisors(dp, cfg.n_routed_experts) if cfg.n_routed_experts % e == 0]
            in_node = max(e for e in eps if e <= gpus_per_node)
            for mbs in mbs_options:
                if train.global_batch_size % (mbs * dp):
                    continue
                n_micro = train.global_batch_size // (mbs * dp)
                if pp > 1 and n_micro < pp:  # fewer micro-batches than stages: mostly bubble
                    continue
                at_mbs = train.model_copy(update={"micro_batch_size": mbs})
                for ep in [1] if tp > 1 else [e for e in eps if e >= in_node]:
                    layout = ParallelConfig(gpus=gpus, dp_shard=dp, tp=tp, pp=pp, ep=ep)
                    if not layout_problems(cfg, at_mbs, layout, gpus_per_node):
                        yield layout, mbs, n_micro


def _with_resharding(layout: ParallelConfig, mbs: int, n_micro: int):
    """The layout keeping FSDP's gathered weights until backward (ZeRO-2: no second all-gather), then
    as it is (ZeRO-3 without a pipeline). On 2 H200s, compiled, `small`: 12 % more tokens/s with FSDP,
    7 % with FSDP + EP, for 2.6 GB more a GPU (docs/distributed.md)."""
    if layout.dp > 1 and layout.pp == 1:
        yield layout.model_copy(update={"reshard_after_forward": False}), mbs, n_micro
    yield layout, mbs, n_micro


def _judge(
    run: RunConfig, gpus: int, gpu_memory_gb: float, hours: float | None, mfu: float, peak_tflops: float,
    ratio: float, headroom: float, gpus_per_node: int,
) -> Choice:
    cfg, train = run.model, run.train
    counts = count_params(cfg)
    tokens = math.ceil(ratio * counts.active)
    flops = float(training_flops_per_token(cfg, train.seq_len).total) * tokens
    base = {"name": run.name, "total_params": counts.total, "active_params": counts.active,
            "tokens": tokens, "flops": flops}
    layouts = list(_layouts(cfg, train, gpus, gpus_per_node))
    if not layouts:
        return Choice(**base, fits=False, reason=(
            f"its global batch of {train.global_batch_size} sequences cannot be split over {gpus} GPUs "
            f"(data-parallel ranks <= {train.global_batch_size}, tp <= {gpus_per_node}, "
            f"pp <= {cfg.num_hidden_layers} layers)"
        ))
    prof = memory_profile(cfg)
    smallest = None
    for recompute in (False, True):  # recomputation costs a forward pass: only when nothing else fits
        for layout, mbs, n_micro in (x for base in layouts for x in _with_resharding(*base)):
            mem = estimate_memory(prof, layout, seq_len=train.seq_len, micro_batch=mbs, n_micro=n_micro,
                                  recompute=recompute, loss_chunk_tokens=train.loss_chunk_tokens,
                                  eager=not train.compile, optimizer_bytes=optimizer_bytes_for(train, gpus),
                                  grad_bytes=grad_bytes_for(train, gpus))
            if not mem.fits(gpu_memory_gb, headroom):
                smallest = mem if smallest is None or mem.total < smallest.total else smallest
                continue
            layout = layout.model_copy(update={"gpu_memory_gb": gpu_memory_gb})
            h = training_hours(flops, gpus, mfu, peak_tflops, recompute)
            late = hours is not None and h > hours
            reason = f"needs {h:,.1f} h at {mfu:.0%} MFU, more than the {hours:g} h budget" if late else ""
            return Choice(**base, fits=not late, reason=reason, parallel=layout, micro_batch_size=mbs,
                          memory=mem, hours=h, recompute=recompute)
    assert smallest is not None
    return Choice(**base, fits=False, reason=(
        f"needs at least {smallest.total / GiB:.1f} GiB per GPU in any layout (with recomputation); "
        f"{gpu_memory_gb * (1 - headroom):.1f} GiB usable of {gpu_memory_gb:g}"
    ))


def select_configs(
    runs: list[RunConfig],
    gpus: int,
    gpu_memory_gb: float,
    hours: float | None = None,
    mfu: float = 0.4,
    peak_tflops: float = DEFAULT_PEAK_TFLOPS,
    ratio: float = CHINCHILLA_MIN,
    headroom: float = HEADROOM,
    gpus_per_node: int = 8,
) -> list[Choice]:
    """Judge each run for `gpus` x `gpu_memory_gb`: fitting ones first, the largest active model first.

    Per run, the simplest layout that fits wins: no recomputation before recomputation, then the order
    of `_layouts`. Time is the Chinchilla budget (`ratio` x N_active tokens) at `mfu` of `peak_tflops`.
    """
    if gpus < 1 or gpu_memory_gb <= 0 or not 0 < mfu <= 1 or (hours is not None and hours <= 0):
        raise ValueError("need gpus >= 1, gpu_memory_gb > 0, 0 < mfu <= 1 and hours > 0")
    args = (gpus, gpu_memory_gb, hours, mfu, peak_tflops, ratio, headroom, gpus_per_node)
    choices = [_judge(run, *args) for run in runs]
    return sorted(choices, key=lambda c: (not c.fits, -c.active_params, c.hours or 0.0))
