"""The training loop: one process, one device, a plain model; parallel plans can wrap it later.

Per optimizer step: `global_batch_size / micro_batch_size` micro-batches are run and backpropagated
(bf16 autocast on GPU, fp32 on CPU), the gradients are clipped, the step is skipped if the loss or
the gradient norm is not finite, AdamW steps, and each MoE layer's routing bias moves by γ toward
an even load (DeepSeek-V3's auxiliary-loss-free balancing, no gradient involved).
"""

from __future__ import annotations

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

from dsv3 import scaling
from dsv3.checkpoints import best_checkpoint, list_checkpoints
from dsv3.config import ConfigError, RunConfig
from dsv3.infer.text import sample_text
from dsv3.io import write_json_atomic
from dsv3.train import checkpoint as ckpt
from dsv3.train.evaluate import router_entropy, unigram_loss, validation_loss
from dsv3.train.loader import build_data
from dsv3.train.metrics import CollapseMonitor, expert_load_stats, peak_memory
from dsv3.train.optim import bias_update_speed, build_optimizer, describe_bias_update_speed, lr_at, set_lr
from dsv3.train.plots import plot_run
from dsv3.train.sinks import MetricsLogger, truncate_metrics

__all__ = ["Trainer", "TrainResult", "TrainingDiverged", "train"]

log = logging.getLogger(__name__)

Record = dict[str, Any]


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


def _check_single_device(cfg: RunConfig) -> None:
    """The trainer runs one process on one device: refuse a layout it would otherwise ignore."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise ConfigError(
            f"launched with WORLD_SIZE={world}: dsv3 train runs one process on one device for now "
            "(distributed training is in progress, see the README's Status); launch it without torchrun"
        )
    p = cfg.parallel
    asked = {k: getattr(p, k) for k in ("gpus", "dp_replicate", "dp_shard", "tp", "pp", "ep")}
    if any(v > 1 for v in asked.values()):
        layout = ", ".join(f"{k}={v}" for k, v in asked.items() if v > 1)
        raise ConfigError(
            f"parallel: {layout} asks for more than one device; dsv3 train runs one process on one device "
            "for now (distributed training is in progress, see the README's Status): set parallel.gpus=1 "
            "and leave dp_replicate, dp_shard, tp, pp and ep at 1"
        )


class Trainer:
    """Owns the model, optimizer, data and logs of one run; `fit()` trains to `train.steps`."""

    def __init__(
        self, cfg: RunConfig, resume: str | None = None, on_record: Callable[[Record], None] | None = None
    ) -> None:
        _check_single_device(cfg)
        self.cfg, self.tc = cfg, cfg.train
        self.on_record = on_record or (lambda r: None)
        self.out = Path(self.tc.output_dir)
        self.device = _pick_device(self.tc.device)
        use_bf16 = self.tc.dtype == "bfloat16" or (self.tc.dtype == "auto" and self.device.type == "cuda")
        self.autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
        )
        self.n_micro = self.tc.global_batch_size // self.tc.micro_batch_size
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
        self.model = self._build_model()
        self.optimizer = build_optimizer(self.model, self.tc)
        self.step = 0
        self.bad_steps = 0
        self.last_eval: Record | None = None
        if self.resume_from is not None:
            state = ckpt.restore_training_state(self.resume_from, self.model, self.optimizer)
            self.step, self.bad_steps = state["step"], state.get("bad_steps", 0)
            self.data.sampler.load_state_dict(state["sampler"])
            log.info("resumed from %s at step %d", self.resume_from, self.step)
        ckpt.remove_stale_temps(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        if self.resume_from is not None:
            truncate_metrics(self.out, self.step)
        write_json_atomic(self.out / "run_config.json", cfg.model_dump(mode="json"), indent=1, sort_keys=True)
        self.metrics = MetricsLogger(
            self.out, self.tc, cfg.name, cfg.model_dump(mode="json"),
            resumed_at=self.step + 1 if self.resume_from is not None else None,
        )

        self.valid_batches = self.data.valid_batches(self.tc.micro_batch_size, self.tc.eval_batches)
        counts = self.data.train.token_counts(cfg.model.vocab_size)
        self.unigram = unigram_loss(counts, self.valid_batches)
        flops = scaling.training_flops_per_token(cfg.model, self.tc.seq_len)
        self.flops_per_token = flops.total if self.tc.mtp_lambda > 0 else flops.without_mtp
        self.peak_flops = scaling.device_peak_flops(self.device)
        m = cfg.model
        self.collapse = CollapseMonitor(self._moe_layer_names(), m.n_routed_experts / m.num_experts_per_tok)

    # --- setup ---------------------------------------------------------------------------------
    def _build_model(self) -> torch.nn.Module:
        from dsv3.model import Transformer

        if self.resume_from is not None:
            model = ckpt.load_model(self.resume_from, self.cfg.model, self.device)
        else:
            model = Transformer(self.cfg.model, seed=self.tc.seed).to(self.device)
        model.activation_checkpointing = self.tc.activation_checkpointing
        if self.tc.compile:
            model.compile_blocks()
        model.train()
        return model

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

    def _run_record(self) -> Record:
        counts = scaling.count_params(self.cfg.model)
        kv = scaling.kv_cache_bytes_per_token(self.cfg.model)
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
            "moe_layers": self._moe_layer_names(),
            "train_windows": len(self.data.train),
            "valid_windows": len(self.data.valid),
            "tokens_per_step": self.tc.tokens_per_step,
            "unigram_loss": self.unigram,
            "bias_update_speed": describe_bias_update_speed(self.tc),
            "resumed_from": str(self.resume_from) if self.resume_from else None,
        }

    def _moe_layer_names(self) -> list[str]:
        moe_ids = {id(m) for m in self.model.moe_layers()}
        return [n for n, m in self.model.named_modules() if id(m) in moe_ids]

    def _emit(self, record: Record) -> None:
        self.metrics.log(record)
        self.on_record(record)

    # --- one optimizer step -----------------------------------------------------------------
    def train_step(self) -> Record:
        """Run one optimizer step (or skip it when non-finite) and return its numbers."""
        tc = self.tc
        lr, gamma = lr_at(self.step, tc), bias_update_speed(self.step, tc)
        set_lr(self.optimizer, lr)
        parts = torch.zeros(4, device=self.device)  # loss, lm, mtp, balance (means over micro-batches)
        load = None
        for _ in range(self.n_micro):
            batch = self.data.next_batch(tc.micro_batch_size).to(self.device, non_blocking=True)
            with self.autocast:
                out = self.model.forward_with_losses(
                    batch[:, :-1], batch[:, 1:], mtp_lambda=tc.mtp_lambda, balance_alpha=tc.balance_alpha,
                    return_logits=False,
                )
            (out.loss / self.n_micro).backward()
            zero = out.lm_loss.new_zeros(())
            parts += torch.stack([
                out.loss.detach(), out.lm_loss.detach(),
                zero if out.mtp_loss is None else out.mtp_loss.detach(),
                zero if out.balance_loss is None else out.balance_loss.detach(),
            ]) / self.n_micro
            step_load = self.model.expert_load()
            load = step_load if load is None else load + step_load
        max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        finite = bool(torch.isfinite(parts[0]) & torch.isfinite(grad_norm))
        if finite:
            self.optimizer.step()
            if gamma > 0:
                for moe, layer_load in zip(self.model.moe_layers(), load, strict=True):
                    moe.update_bias(gamma, layer_load)
            self.bad_steps = 0
        else:
            self.bad_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        loss, lm, mtp, bal = parts.tolist()
        record: Record = {
            "kind": "train" if finite else "skip",
            "step": self.step,
            "loss": loss,
            "lm_loss": lm,
            "mtp_loss": mtp,
            "balance_loss": bal,
            "lr": lr,
            "bias_update_speed": gamma,
            "grad_norm": grad_norm.item(),
            "tokens": self.step * tc.tokens_per_step,
        }
        if load is not None and load.numel():
            biases = torch.stack([m.gate.e_score_correction_bias for m in self.model.moe_layers()])
            record.update(expert_load_stats(load.cpu(), biases.cpu()))
            if warning := self.collapse.update(self.step, record["imbalance"], gamma):
                log.warning(warning)
        return record

    # --- evaluation and checkpoints -------------------------------------------------------------
    def evaluate(self) -> Record:
        # Hooks inside compiled blocks would force recompiles: no router entropy under torch.compile.
        with nullcontext([]) if self.tc.compile else router_entropy(self.model) as entropy:
            val = validation_loss(self.model, self.valid_batches, self.device, self.autocast)
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
        if self.tokenizer is None or self.tc.sample_tokens == 0:
            return None
        prompt = self.tc.sample_prompt or ""
        return prompt + sample_text(
            self.model, self.tokenizer, prompt, self.tc.sample_tokens, seed=self.tc.seed + self.step
        )

    def save(self) -> Path:
        evaluated_now = self.last_eval is not None and self.last_eval["step"] == self.step
        state = {
            "tokens_seen": self.step * self.tc.tokens_per_step,
            "sampler": self.data.sampler.state_dict(),
            "scheduler": {"schedule": self.tc.schedule, "next_lr": lr_at(self.step, self.tc)},
            "bad_steps": self.bad_steps,
            "val_loss": self.last_eval["val_loss"] if evaluated_now else None,
        }
        path = ckpt.save_checkpoint(
            self.out, self.step, model=self.model, optimizer=self.optimizer, trainer_state=state,
            run_config=self.cfg, tokenizer=self.tokenizer_path,
        )
        for removed in ckpt.prune_checkpoints(self.out, self.tc.keep_last):
            log.info("removed old checkpoint %s", removed)
        return path

    # --- the loop ------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        tc = self.tc
        t_start = time.perf_counter()
        self._emit(self._run_record())
        last_ckpt = self.resume_from
        t_log, step_log = time.perf_counter(), self.step
        try:
            while self.step < tc.steps:
                record = self.train_step()
                if record["kind"] == "skip":
                    log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)",
                                self.step, self.bad_steps)
                    self._emit(record)
                    if self.bad_steps >= tc.max_bad_steps:
                        raise TrainingDiverged(
                            f"{self.bad_steps} non-finite steps in a row (train.max_bad_steps): stopping at "
                            f"step {self.step}; resume from an earlier checkpoint with a lower train.lr"
                        )
                elif self.step % tc.log_every == 0 or self.step == tc.steps:
                    now = time.perf_counter()
                    rate = (self.step - step_log) * tc.tokens_per_step / max(now - t_log, 1e-9)
                    record["tokens_per_s"] = rate
                    record["mfu"] = rate * self.flops_per_token / self.peak_flops if self.peak_flops else None
                    record["elapsed_s"] = now - t_start
                    record["eta_s"] = (tc.steps - self.step) * tc.tokens_per_step / max(rate, 1e-9)
                    record.update(peak_memory(self.device))
                    self._emit(record)
                    t_log, step_log = now, self.step
                if self.step % tc.eval_every == 0 or self.step == tc.steps:
                    self._emit(self.evaluate())
                if self.step % tc.save_every == 0 or self.step == tc.steps:
                    last_ckpt = self.save()
                    t_log = time.perf_counter()  # keep checkpoint time out of tokens/s
            if self.last_eval is None:  # resumed a finished run: report where it stands
                self._emit(self.evaluate())
        finally:
            self.metrics.close()
        plots = plot_run(self.out)
        best = best_checkpoint(self.out)
        ev = self.last_eval or {}
        return TrainResult(
            output_dir=self.out, step=self.step, val_loss=ev.get("val_loss"), val_ppl=ev.get("val_ppl"),
            unigram_loss=self.unigram, unigram_ppl=math.exp(self.unigram), last_checkpoint=last_ckpt,
            best_checkpoint=best, plots=plots, sample=ev.get("sample"), wall_s=time.perf_counter() - t_start,
            peak_memory_gb=peak_memory(self.device),
            kv_cache_bytes_per_token=scaling.kv_cache_bytes_per_token(self.cfg.model).mla_bf16,
        )


def train(
    cfg: RunConfig, resume: str | None = None, on_record: Callable[[Record], None] | None = None
) -> TrainResult:
    """Train `cfg` (from scratch, or from `resume`: a checkpoint directory or "auto")."""
    return Trainer(cfg, resume=resume, on_record=on_record).fit()
