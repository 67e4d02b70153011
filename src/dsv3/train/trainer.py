"""The training loop, in one process or over torchrun's ranks.

Per optimizer step: `global_batch_size / micro_batch_size` micro-batches are run and backpropagated
(bf16 autocast on GPU, fp32 on CPU), the gradients are clipped, the step is skipped if the loss or
the gradient norm is not finite, AdamW steps, and each MoE layer's routing bias moves by γ toward
an even load (DeepSeek-V3's auxiliary-loss-free balancing, no gradient involved).

Launched by torchrun (WORLD_SIZE > 1), the model is laid out as `parallel:` says (`dsv3.parallel`),
each data-parallel rank takes its share of every global batch, and `DistributedSteps` makes the
step's collective parts; rank 0 alone logs, evaluates into records, samples, plots and publishes
checkpoints (sharded, `dsv3.train.sharded`). One process keeps today's path exactly: a resumed run
reproduces the uninterrupted one bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from dsv3 import scaling
from dsv3.checkpoints import best_checkpoint, is_sharded, list_checkpoints, verify_checkpoint
from dsv3.config import ConfigError, RunConfig
from dsv3.host_copy import HostCopy
from dsv3.infer.text import sample_text
from dsv3.io import write_json_atomic
from dsv3.model.fp8_linear import convert_to_fp8
from dsv3.parallel import build_meshes, check_world_size, init_distributed, parallelize, world_size
from dsv3.train import checkpoint as ckpt
from dsv3.train.distributed import DistributedSteps
from dsv3.train.evaluate import router_entropy, unigram_loss, validation_loss
from dsv3.train.loader import build_data
from dsv3.train.master_weights import Float32GradAccumulation, keep_master_weights
from dsv3.train.metrics import CollapseMonitor, expert_load_stats, peak_memory
from dsv3.train.optim import (
    bias_update_speed,
    build_optimizer,
    clip_coefficient,
    describe_bias_update_speed,
    folds_clipping,
    lr_at,
    set_lr,
    skips_on_device,
    total_grad_norm,
)
from dsv3.train.plots import plot_run
from dsv3.train.profiler import StepProfiler
from dsv3.train.saver import CheckpointWriter
from dsv3.train.sharded import load_full_checkpoint, load_sharded_checkpoint
from dsv3.train.sinks import MetricsLogger, truncate_metrics
from dsv3.train.step import micro_batch

__all__ = ["Trainer", "TrainResult", "TrainingDiverged", "train"]

log = logging.getLogger(__name__)

Record = dict[str, Any]


@dataclass
class PendingStep:
    """An optimizer step queued on the device whose numbers are still on their way to the host."""

    step: int
    lr: float
    gamma: float
    numbers: HostCopy


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row: the run stops instead of burning compute on NaNs."""


@dataclass
class TrainResult:
    output_dir: Path
    step: int
    val_loss: float | None = None
    val_ppl: float | None = None
    unigram_loss: float | None = None
    unigram_ppl: float | None = None
    last_checkpoint: Path | None = None
    best_checkpoint: Path | None = None
    plots: list[Path] = field(default_factory=list)
    sample: str | None = None
    wall_s: float = 0.0
    peak_memory_gb: dict[str, float] = field(default_factory=dict)
    kv_cache_bytes_per_token: int = 0


def _pick_device(want: str) -> torch.device:
    if want == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda requested but torch sees no GPU")
    return torch.device(want)


def _check_layout(cfg: RunConfig, world: int) -> None:
    """The launch matches `parallel:`, and the layout is one this trainer runs (one line naming the keys)."""
    check_world_size(cfg.parallel, world)
    ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world)) if world > 1 else None
    problems = scaling.layout_problems(cfg.model, cfg.train, cfg.parallel, ranks_per_node)
    if problems:
        raise ConfigError("; ".join(problems))


class Trainer:
    """Owns the model, optimizer, data and logs of one run; `fit()` trains to `train.steps`."""

    def __init__(
        self, cfg: RunConfig, resume: str | None = None, on_record: Callable[[Record], None] | None = None
    ) -> None:
        self.cfg, self.tc = cfg, cfg.train
        world = world_size()
        _check_layout(cfg, world)
        self.on_record = on_record or (lambda r: None)
        self.out = Path(self.tc.output_dir)
        self.device = _pick_device(self.tc.device)
        self.world, self.distributed = world, world > 1
        if cfg.parallel.cpu_offload and self.device.type != "cuda":
            raise ConfigError("parallel.cpu_offload keeps GPU state in host memory: needs train.device cuda")
        if self.tc.fp8 and self.tc.compile and self.device.type != "cuda":
            raise ConfigError("train.fp8 with train.compile needs train.device cuda (Inductor's CPU code "
                              "generator fails on the FP8 backward): drop one of them on CPU")
        if self.distributed:
            self.device = init_distributed(self.device.type)
            meshes = build_meshes(cfg.parallel, self.device.type)
        self.rank = dist.get_rank() if self.distributed else 0
        use_bf16 = self.tc.computes_in_bf16(self.device.type)
        self.autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
        )
        self.n_micro = self.tc.global_batch_size // (self.tc.micro_batch_size * cfg.parallel.dp)  # per rank
        self.data = build_data(cfg.data, self.tc.seq_len, self.tc.seed)
        self.tokenizer_path = Path(cfg.data.tokenizer) if cfg.data.tokenizer else None
        self.tokenizer = self._load_tokenizer()

        self.resume_from = ckpt.resolve_resume(resume, self.out)
        if self.resume_from is None:
            existing = list_checkpoints(self.out)
            if existing:
                raise ConfigError(
                    f"{self.out} already holds checkpoints (newest {existing[-1].name}): "
                    "pass --resume auto to continue, or choose another train.output_dir"
                )
        torch.manual_seed(self.tc.seed)
        self.steps: DistributedSteps | None = None
        if self.distributed:
            par = parallelize(cfg, meshes, self.device, torch.bfloat16 if use_bf16 else None, self.n_micro)
            self.model, self.masters = par.parts, None
            self.steps = DistributedSteps(cfg, par, self.device, self.autocast)
        else:
            self.model, self.masters = self._build_model()
        self.optimizer = build_optimizer(self.model, self.tc, masters=self.masters)
        self.fp32_grads: Float32GradAccumulation | None = None  # bf16 weights over several micro-batches
        if self.masters and self.n_micro > 1:
            self.fp32_grads = Float32GradAccumulation(list(self.masters))
            self.optimizer.grads = self.fp32_grads.grads
        # No host sync inside a step: fused AdamW (and MixedAdamW) skips a non-finite step on the device,
        # and a step's numbers are read back while the next one runs (`fit`). Every rank computes the
        # same flag (the loss parts are all-reduced, the norm is global). DTensor refuses a mix of plain
        # and DTensor parameters in one fused call (tensor parallelism alone leaves norms and router
        # plain): such a layout keeps the host-side check, as does torch's multi-tensor AdamW on a CPU.
        sharded = [isinstance(p, DTensor) for p in self.model.parameters()]
        uniform = all(sharded) or not any(sharded)
        self.skip_on_device = skips_on_device(self.optimizer) and uniform
        self.fold_clipping = folds_clipping(self.optimizer)
        self.read_late = self.device.type == "cuda"
        self.step = 0
        self.bad_steps = 0
        self.last_eval: Record | None = None
        group = dist.new_group(backend="gloo") if self.distributed else None  # checkpoint I/O only
        self.saver = CheckpointWriter(self.out, self.tc.keep_last, self.tc.async_checkpoint, group)
        if self.resume_from is not None:
            state = self._restore(self.resume_from, group)
            self.step, self.bad_steps = state["step"], state.get("bad_steps", 0)
            self.data.sampler.load_state_dict(state["sampler"])
            log.info("resumed from %s at step %d", self.resume_from, self.step)
        self.metrics: MetricsLogger | None = None
        if self.rank == 0:
            ckpt.remove_stale_temps(self.out)
            self.out.mkdir(parents=True, exist_ok=True)
            if self.resume_from is not None:
                truncate_metrics(self.out, self.step)
            write_json_atomic(self.out / "run_config.json", cfg.model_dump(mode="json"), indent=1,
                              sort_keys=True)
            self.metrics = MetricsLogger(
                self.out, self.tc, cfg.name, cfg.model_dump(mode="json"),
                resumed_at=self.step + 1 if self.resume_from is not None else None,
            )

        self.valid_batches = self.data.valid_batches(self.tc.micro_batch_size, self.tc.eval_batches)
        self.unigram = 0.0
        if self.rank == 0:  # a statistic of the data for the records: one rank reads it
            counts = self.data.train.token_counts(cfg.model.vocab_size)
            self.unigram = unigram_loss(counts, self.valid_batches)
        flops = scaling.training_flops_per_token(cfg.model, self.tc.seq_len)
        self.flops_per_token = flops.total if self.tc.mtp_lambda > 0 else flops.without_mtp
        peak = scaling.device_peak_flops(self.device)  # None on a CPU
        self.peak_flops = None if peak is None else peak * world
        m = cfg.model
        self.collapse = CollapseMonitor(self._moe_names(), m.n_routed_experts / m.num_experts_per_tok)

    # --- setup ---------------------------------------------------------------------------------
    def _build_model(self) -> tuple[torch.nn.Module, dict[torch.nn.Parameter, torch.Tensor] | None]:
        """The one-process model, laid out and compiled as `train:` says, and the float32 masters of its
        weights where it holds bf16 weights (`param_dtype`; None otherwise)."""
        from dsv3.model import Transformer

        if self.resume_from is not None and not is_sharded(self.resume_from):
            model = ckpt.load_model(self.resume_from, self.cfg.model, self.device)
        else:
            model = Transformer(self.cfg.model, seed=self.tc.seed).to(self.device)
        model.activation_checkpointing = self.tc.activation_checkpointing
        model.loss_chunk_tokens = self.tc.loss_chunk_tokens
        masters = None
        if self.tc.bf16_weights(self.device.type, self.world):
            masters = keep_master_weights(model)  # before compiling: the graphs see bf16 weights
        if self.tc.fp8:
            convert_to_fp8(model)
        if self.tc.compile == "model":
            model.compile_model()
        elif self.tc.compile:
            model.compile_blocks()
        model.train()
        return model, masters

    def _restore(self, directory: Path, group: dist.ProcessGroup | None) -> dict:
        """Weights (unless `_build_model` loaded them), optimizer and RNG state; the trainer state."""
        if not is_sharded(directory):
            if self.distributed:
                return load_full_checkpoint(directory, self.model, self.optimizer, self.cfg)
            return ckpt.restore_training_state(directory, self.model, self.optimizer)
        if self.rank == 0:  # one reader checks every byte against the manifest
            verify_checkpoint(directory, checksums=True)
        ckpt.check_architecture(directory, self.cfg.model)
        return load_sharded_checkpoint(directory, self.model, self.optimizer, group)

    def _load_tokenizer(self):
        if self.tokenizer_path is None:
            return None
        from dsv3.data.tokenizer import load_tokenizer

        tok = load_tokenizer(self.tokenizer_path)
        if tok.get_vocab_size() > self.cfg.model.vocab_size:
            raise ConfigError(
                f"data.tokenizer has {tok.get_vocab_size()} tokens but model.vocab_size is "
                f"{self.cfg.model.vocab_size}: set model.vocab_size to at least the tokenizer's"
            )
        return tok

    def _moe_names(self) -> list[str]:
        if self.steps is not None:
            return self.steps.par.moe_names
        moe_ids = {id(m) for m in self.model.moe_layers()}
        return [n for n, m in self.model.named_modules() if id(m) in moe_ids]

    def _run_record(self) -> Record:
        counts = scaling.count_params(self.cfg.model)
        kv = scaling.kv_cache_bytes_per_token(self.cfg.model)
        p = self.cfg.parallel
        return {
            "kind": "run",
            "step": self.step,
            "name": self.cfg.name,
            "device": str(self.device),
            "params": counts.total,
            "active_params": counts.active,
            "flops_per_token": self.flops_per_token,
            "kv_cache_bytes_per_token": kv.mla_bf16,
            "kv_cache_bytes_per_token_mha": kv.mha_bf16,
            "moe_layers": self._moe_names(),
            "world_size": p.gpus if self.distributed else 1,
            "layout": scaling.describe_layout(p) if self.distributed else None,
            "train_windows": len(self.data.train),
            "valid_windows": len(self.data.valid),
            "tokens_per_step": self.tc.tokens_per_step,
            "precision": self._precision(),
            "unigram_loss": self.unigram,
            "bias_update_speed": describe_bias_update_speed(self.tc),
            "resumed_from": str(self.resume_from) if self.resume_from else None,
        }

    def _precision(self) -> str:
        """What `dtype` and `param_dtype` resolved to, for the run record and its header line."""
        bf16 = self.tc.computes_in_bf16(self.device.type) or self.masters is not None
        compute = "bf16" if bf16 else "fp32"
        weights = "bf16 weights + fp32 masters" if self.masters is not None else "fp32 weights"
        moments = "bf16" if self.tc.bf16_moments_with(self.masters is not None) else "fp32"
        return f"{weights}, {compute} compute, {moments} AdamW moments"

    def _emit(self, record: Record) -> None:
        if self.metrics is not None:  # rank 0
            self.metrics.log(record)
            self.on_record(record)

    # --- one optimizer step -----------------------------------------------------------------
    def train_step(self) -> Record:
        """Run one optimizer step (or skip it when non-finite) and return its numbers."""
        return self._read_step(self._queue_step())

    def _queue_step(self) -> PendingStep:
        """Queue one optimizer step on the device without reading anything back: the finite check, the
        skip, the bias update and the step's statistics stay on the device (`_read_step` reads them)."""
        tc = self.tc
        lr, gamma = lr_at(self.step, tc), bias_update_speed(self.step, tc)
        set_lr(self.optimizer, lr)
        max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf
        fold = self.fold_clipping and tc.grad_clip > 0  # the optimizer scales the gradients it reads
        if self.steps is not None:
            dp_rank, dp = self.steps.meshes.dp_rank, self.cfg.parallel.dp
            share = self.data.next_share(tc.global_batch_size, dp_rank, dp)
            micro_batches = list(share.split(tc.micro_batch_size))
            parts, load = self.steps.reduce(*self.steps.forward_backward(micro_batches))
            grad_norm = self.steps.clip(max_norm, apply=not fold)
        else:
            parts, load = self._forward_backward()
            if self.fp32_grads is not None:
                grads = list(self.fp32_grads.grads.values())
            else:
                grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            grad_norm = total_grad_norm(grads)
            if not fold:
                torch.nn.utils.clip_grads_with_norm_(self.model.parameters(), max_norm, grad_norm)
        if fold:
            self.optimizer.grad_scale = clip_coefficient(grad_norm, max_norm)
        finite = torch.isfinite(parts[0]) & torch.isfinite(grad_norm)
        stepped = self._optimizer_step(finite)
        if gamma > 0 and self.steps is not None:
            self.steps.update_bias(gamma, load, stepped)
        elif gamma > 0:
            for moe, layer_load in zip(self.model.moe_layers(), load, strict=True):
                moe.update_bias(gamma, layer_load, stepped)
        self.optimizer.zero_grad(set_to_none=True)
        if self.fp32_grads is not None:
            self.fp32_grads.reset()
        self.step += 1
        numbers = {"parts": parts, "grad_norm": grad_norm, "finite": finite}
        if load is not None and load.numel():
            numbers["load"] = load
            if self.steps is not None:
                numbers["biases"] = self.steps.biases()
            else:
                moes = self.model.moe_layers()
                numbers["biases"] = torch.stack([m.gate.e_score_correction_bias for m in moes])
        return PendingStep(self.step, lr, gamma, HostCopy(numbers))

    def _optimizer_step(self, finite: torch.Tensor) -> torch.Tensor | None:
        """AdamW's update where `finite` holds; returns the flag the bias update must follow (None: the
        step ran). Fused AdamW takes the flag on the device (its `found_inf`, as GradScaler sets it) and
        skips the update itself, so the host never waits; the other kernels need the value read.
        (Clipping inside the kernel through its `grad_scale` was tried: no gain measured on the H200.)"""
        if self.skip_on_device:
            self.optimizer.found_inf = (~finite).float()
            self.optimizer.step()
            return finite
        if bool(finite):
            self.optimizer.step()
            return None
        return finite  # false: no bias moves either

    def _read_step(self, pending: PendingStep) -> Record:
        """The record of a queued step, read back from the device (waiting for it if it is still running)."""
        values = pending.numbers.get()
        finite = bool(values["finite"])
        self.bad_steps = 0 if finite else self.bad_steps + 1
        loss, lm, mtp, bal = values["parts"].tolist()
        record: Record = {
            "kind": "train" if finite else "skip",
            "step": pending.step,
            "loss": loss,
            "lm_loss": lm,
            "mtp_loss": mtp,
            "balance_loss": bal,
            "lr": pending.lr,
            "bias_update_speed": pending.gamma,
            "grad_norm": values["grad_norm"].item(),
            "tokens": pending.step * self.tc.tokens_per_step,
        }
        if "load" in values:
            record.update(expert_load_stats(values["load"], values["biases"], self.cfg.parallel.ep))
            if warning := self.collapse.update(pending.step, record["imbalance"], pending.gamma):
                log.warning(warning)
        return record

    def _forward_backward(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One process: the step's micro-batches forward and backward; (loss parts (4,), load (n_moe, E))."""
        tc = self.tc
        parts = torch.zeros(4, device=self.device)  # loss, lm, mtp, balance (means over micro-batches)
        load = None
        for _ in range(self.n_micro):
            batch = self.data.next_batch(tc.micro_batch_size)
            if self.device.type == "cuda":  # a pinned buffer copies behind the running step
                batch = batch.pin_memory()
            batch = batch.to(self.device, non_blocking=True)
            parts += micro_batch(self.model, batch, tc, self.n_micro, self.autocast)
            step_load = self.model.expert_load()
            load = step_load if load is None else load + step_load
        return parts, load

    # --- evaluation and checkpoints -------------------------------------------------------------
    def evaluate(self) -> Record:
        # Hooks inside compiled blocks would force recompiles: no router entropy under torch.compile.
        if self.steps is not None:
            val, entropy = self.steps.validation(self.valid_batches, entropy=not self.tc.compile)
        else:
            moes = list(self.model.moe_layers())
            with nullcontext(None) if self.tc.compile else router_entropy(moes) as acc:
                val = validation_loss(self.model, self.valid_batches, self.device, self.autocast)
            entropy = [] if acc is None else acc.values()
        record: Record = {
            "kind": "eval",
            "step": self.step,
            "val_loss": val,
            "val_ppl": math.exp(min(val, 50.0)),
            "unigram_loss": self.unigram,
            "unigram_ppl": math.exp(self.unigram),
            "router_entropy": entropy,
        }
        sample = self._sample()
        if sample is not None:
            record["sample"] = sample
        self.last_eval = record
        return record

    def _sample(self) -> str | None:
        """A continuation of the sample prompt. Distributed, every rank decodes the same tokens through
        its shards (FSDP, experts); a pipeline or tensor-parallel layout does not sample."""
        if self.tokenizer is None or self.tc.sample_tokens == 0:
            return None
        p = self.cfg.parallel
        if self.distributed and (p.pp > 1 or p.tp > 1):
            return None
        prompt = self.tc.sample_prompt or ""
        with self.autocast if self.distributed else nullcontext():
            text = sample_text(self.model, self.tokenizer, prompt, self.tc.sample_tokens,
                               seed=self.tc.seed + self.step, cuda_graph=False if self.distributed else None)
        return prompt + text

    def save(self) -> Path:
        evaluated_now = self.last_eval is not None and self.last_eval["step"] == self.step
        state = {
            "tokens_seen": self.step * self.tc.tokens_per_step,
            "sampler": self.data.sampler.state_dict(),
            "scheduler": {"schedule": self.tc.schedule, "next_lr": lr_at(self.step, self.tc)},
            "bad_steps": self.bad_steps,
            "val_loss": self.last_eval["val_loss"] if evaluated_now else None,
        }
        path, stall = self.saver.save(
            self.step, model=self.model, optimizer=self.optimizer, trainer_state=state, run_config=self.cfg,
            tokenizer=self.tokenizer_path,
        )
        self._emit({"kind": "save", "step": self.step, "path": str(path), "stall_s": stall,
                    "background": self.tc.async_checkpoint})
        return path

    def _peak_memory(self) -> dict[str, float]:
        return self.steps.peak_memory() if self.steps is not None else peak_memory(self.device)

    # --- the loop ------------------------------------------------------------------------------
    def _report(self, record: Record, t_start: float) -> None:
        """Log a step's record (every skip, and every `log_every`-th step with its throughput since the
        last one, `self.rate_mark`); stop the run after `max_bad_steps` skips in a row."""
        tc, step = self.tc, record["step"]
        if record["kind"] == "skip":
            log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", step,
                        self.bad_steps)
            self._emit(record)
            if self.bad_steps >= tc.max_bad_steps:
                raise TrainingDiverged(
                    f"{self.bad_steps} non-finite steps in a row (train.max_bad_steps): stopping at "
                    f"step {step}; resume from an earlier checkpoint with a lower train.lr"
                )
        elif step % tc.log_every == 0 or step == tc.steps:
            now = time.perf_counter()
            t_log, step_log = self.rate_mark
            rate = (step - step_log) * tc.tokens_per_step / max(now - t_log, 1e-9)
            record["tokens_per_s"] = rate
            record["tokens_per_s_per_gpu"] = rate / self.world
            record["mfu"] = rate * self.flops_per_token / self.peak_flops if self.peak_flops else None
            record["elapsed_s"] = now - t_start
            record["eta_s"] = (tc.steps - step) * tc.tokens_per_step / max(rate, 1e-9)
            record.update(self._peak_memory())
            self._emit(record)
            self.rate_mark = (now, step)

    def fit(self) -> TrainResult:
        tc = self.tc
        t_start = time.perf_counter()
        self._emit(self._run_record())
        last_ckpt = self.resume_from
        self.rate_mark = (time.perf_counter(), self.step)  # (time, step) tokens/s is counted from
        pending: PendingStep | None = None
        profiler = StepProfiler(self.out, self.rank, tc.profile_from, tc.profile_steps, self.device)
        try:
            while self.step < tc.steps:
                profiler.before_step(self.step + 1)
                queued = self._queue_step()
                profiler.after_step(self.step)
                self.saver.prepare(self.model, self.optimizer)  # once: the optimizer has state now
                if pending is not None:  # the previous step's numbers, read while this one runs
                    self._report(self._read_step(pending), t_start)
                pending = queued
                saving = tc.save_every > 0 and (self.step % tc.save_every == 0 or self.step == tc.steps)
                boundary = self.step % tc.eval_every == 0 or saving
                if boundary or self.step == tc.steps or not self.read_late:
                    self._report(self._read_step(pending), t_start)
                    pending = None
                if self.step % tc.eval_every == 0 or self.step == tc.steps:
                    self._emit(self.evaluate())
                if saving:
                    last_ckpt = self.save()
                    self.rate_mark = (time.perf_counter(), self.rate_mark[1])  # saves are not training time
            profiler.stop()  # a run shorter than its window still writes what it recorded
            if self.last_eval is None:  # resumed a finished run: report where it stands
                self._emit(self.evaluate())
            self.saver.close()
        except BaseException:
            if not self.distributed:  # an interrupted run still publishes the save already under way
                with contextlib.suppress(Exception):
                    self.saver.close()
            raise
        finally:
            if self.metrics is not None:
                self.metrics.close()
        memory = self._peak_memory()
        plots = plot_run(self.out) if self.rank == 0 else []
        best = best_checkpoint(self.out) if self.rank == 0 else None
        ev = self.last_eval or {}
        return TrainResult(
            output_dir=self.out, step=self.step, val_loss=ev.get("val_loss"), val_ppl=ev.get("val_ppl"),
            unigram_loss=self.unigram, unigram_ppl=math.exp(self.unigram), last_checkpoint=last_ckpt,
            best_checkpoint=best, plots=plots, sample=ev.get("sample"), wall_s=time.perf_counter() - t_start,
            peak_memory_gb=memory,
            kv_cache_bytes_per_token=scaling.kv_cache_bytes_per_token(self.cfg.model).mla_bf16,
        )


def train(
    cfg: RunConfig, resume: str | None = None, on_record: Callable[[Record], None] | None = None
) -> TrainResult:
    """Train `cfg` (from scratch, or from `resume`: a checkpoint directory or "auto"). Under torchrun
    every rank calls it; rank 0's result names the checkpoints and plots."""
    result = Trainer(cfg, resume=resume, on_record=on_record).fit()
    if dist.is_initialized():
        dist.destroy_process_group()
    return result
