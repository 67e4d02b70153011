"""One training step of dsv3, as `dsv3 train` runs it and as a bare model step, vs transformers'
DeepseekV3ForCausalLM compiled and eager: same config, same batch size, in the same process.

Systems (--systems, default all four, in this order):
  trainer   dsv3's `Trainer` running its own loop (`fit`) on synthetic token shards: fp32 master weights
            + bf16 autocast, clipping, the finite check, the bias update, the expert-load statistics and
            the data loader; tokens/s and MFU are the ones its progress line prints (median over steps)
  dsv3      the bare model step: forward + backward + fused AdamW (+ the bias update), --dtype
  hf        transformers, torch.compile'd (the strongest setting a user would pick), --dtype
  hf-eager  transformers as it comes, --dtype

    python benchmarks/train_step.py --preset small --batch 8 --seq 2048 --compile      # one GPU
    python benchmarks/train_step.py --device cpu --preset tiny --batch 2 --seq 64 --steps 2  # smoke

Prints one JSON line per system (tokens/s, MFU, peak memory) and a last line with the ratios to
compiled transformers. MFU counts 6·N_active + causal attention FLOPs per token
(dsv3.scaling.training_flops_per_token) over 989 TFLOP/s (H100/H200 dense bf16). No system trains MTP
(transformers does not) unless --mtp, which adds dsv3's MTP loss and its FLOPs to dsv3's systems.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dsv3.config import ModelConfig, RopeScaling, load_model_config, load_run_config
from dsv3.data.shards import IndexedDatasetWriter
from dsv3.model import Transformer, attention
from dsv3.model.fp8_linear import convert_to_fp8
from dsv3.scaling import DEFAULT_PEAK_TFLOPS, training_flops_per_token
from kernel_table import write_kernel_table
from trace_summary import summarize

SYSTEMS = ("trainer", "dsv3", "hf", "hf-eager")


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="model preset or YAML (configs/)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument(
        "--micro-batch", type=int, help="trainer: sequences per forward (default: --batch, no accumulation)"
    )
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--device", default="cuda")
    p.add_argument(
        "--dtype",
        choices=["bf16", "amp"],
        default="bf16",
        help="bf16: bf16 parameters and optimizer state; amp: fp32 parameters + bf16 autocast",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile dsv3's blocks (trainer and dsv3)")
    p.add_argument("--compile-scope", choices=["blocks", "model"], default="blocks",
                   help="with --compile: each block, or the whole training forward (train.compile=model)")
    p.add_argument("--activation-checkpointing", nargs="?", const=True, default=False,
                   choices=[True, "selective"],
                   help="dsv3 recomputes each block (`selective`: all but its GEMM and attention outputs)")
    p.add_argument("--loss-chunk", type=int, default=0, metavar="TOKENS",
                   help="dsv3 computes its losses this many positions at a time (train.loss_chunk_tokens)")
    p.add_argument("--mtp", action="store_true", help="dsv3 also trains its MTP depth(s), λ=0.3")
    p.add_argument("--moments", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="the trainer's AdamW moments (train.optimizer_state_dtype); auto (as `dsv3 train`) = "
                        "bfloat16 with bf16 weights")
    p.add_argument("--param-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="the trainer's weights (train.param_dtype): bfloat16 = bf16 weights, float32 masters "
                        "in the optimizer; auto (as `dsv3 train`) = bfloat16 on a GPU")
    p.add_argument("--fp8", action="store_true",
                   help="dsv3 (trainer and bare step): FP8 linears, blockwise-scaled (train.fp8)")
    p.add_argument(
        "--pad-v",
        choices=["auto", "yes", "no"],
        default="auto",
        help="pad v to the q·k head dim for SDPA (auto: only where cuDNN's attention can't take it)",
    )
    p.add_argument(
        "--sdpa",
        choices=["auto", "flash", "cudnn", "efficient"],
        default="auto",
        help="allow only this fused attention kernel (both systems); auto: torch's own choice",
    )
    p.add_argument(
        "--profile", metavar="PATH",
        help="after timing each system, profile 3 steps: kernel table to PATH.SYSTEM.txt and, on a GPU, "
             "its trace to PATH.SYSTEM.json, summarised as a `trace` line (where the GPU idles, by the "
             "host operator it waited for). The profiler leaves CUPTI attached, which slows later "
             "launches: time the systems after the first in a run without it",
    )  # fmt: skip
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated, of: " + ", ".join(SYSTEMS))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


class _Timer:
    """Per-step wall time: CUDA events on GPU (no sync inside the loop), perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def step_seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]


def _build_dsv3(cfg: ModelConfig, args, device: torch.device) -> tuple[torch.nn.Module, Callable]:
    model = Transformer(cfg, seed=args.seed).to(device)
    model.activation_checkpointing = args.activation_checkpointing
    model.loss_chunk_tokens = args.loss_chunk
    if args.fp8:
        convert_to_fp8(model)
    if args.compile and args.compile_scope == "model":
        model.compile_model()
    elif args.compile:
        model.compile_blocks()
    mtp_lambda = 0.3 if args.mtp else 0.0

    def loss_fn(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return model.forward_with_losses(ids, labels, mtp_lambda=mtp_lambda, return_logits=False).loss

    def after_step() -> None:
        model.update_bias(1e-3)  # part of dsv3's real step: aux-loss-free balancing

    loss_fn.after_step = after_step
    return model, loss_fn


def _build_hf(
    cfg: ModelConfig, args, device: torch.device, compiled: bool
) -> tuple[torch.nn.Module, Callable]:
    import transformers

    torch.manual_seed(args.seed)
    with torch.device(device):
        model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**cfg.to_hf_dict()))
    forward = torch.compile(model) if compiled else model

    def loss_fn(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # shift_labels: the same targets as dsv3's (transformers would otherwise drop the last one)
        return forward(input_ids=ids, labels=labels, shift_labels=labels).loss

    loss_fn.after_step = lambda: None
    return model, loss_fn


def _step(loss_fn: Callable, ids, labels, optimizer, autocast) -> torch.Tensor:
    """One optimizer step; the loss, detached (no host sync)."""
    with autocast:
        loss = loss_fn(ids, labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss_fn.after_step()
    return loss.detach()


def _select_sdpa(choice: str) -> None:
    """Leave only one fused SDPA backend enabled (math stays as the last resort torch falls back to)."""
    if choice == "auto":
        return
    torch.backends.cuda.enable_flash_sdp(choice == "flash")
    torch.backends.cuda.enable_cudnn_sdp(choice == "cudnn")
    torch.backends.cuda.enable_mem_efficient_sdp(choice == "efficient")


def _model_step(system: str, cfg: ModelConfig, args, device: torch.device) -> dict:
    """Time the bare training step of one model system: forward, backward, fused AdamW."""
    if system == "dsv3":
        model, loss_fn = _build_dsv3(cfg, args, device)
    else:
        model, loss_fn = _build_hf(cfg, args, device, compiled=system == "hf")
    if args.dtype == "bf16":
        model.to(torch.bfloat16)  # dsv3 keeps its router bias and rope frequencies in fp32 regardless
    model.train()
    fused = device.type in ("cuda", "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=fused)
    gen = torch.Generator().manual_seed(args.seed)
    data = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen).to(device)
    ids, labels = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.dtype == "amp")
    _reset_memory(device)

    losses = []
    timer = _Timer(device)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            timer.mark()
        losses.append(_step(loss_fn, ids, labels, optimizer, autocast))
        if step >= args.warmup:
            timer.mark()
    seconds = timer.step_seconds()
    if args.profile:
        _profile(f"{args.profile}.{system}", lambda: _step(loss_fn, ids, labels, optimizer, autocast), device)
    tokens_per_s = args.batch * args.seq * len(seconds) / sum(seconds)
    result = {
        "dtype": args.dtype,
        "compiled": (args.compile and args.compile_scope) if system == "dsv3" else system == "hf",
        "steps": len(seconds),
        "tokens_per_s": round(tokens_per_s, 1),
        "step_ms_median": round(1e3 * statistics.median(seconds), 2),
        "mfu": round(tokens_per_s * _flops_per_token(system, cfg, args) / (DEFAULT_PEAK_TFLOPS * 1e12), 4),
        "peak_memory_gb": _peak_memory(device),
        "params": sum(p.numel() for p in model.parameters()),
        "loss_first": round(losses[0].item(), 4),
        "loss_last": round(losses[-1].item(), 4),
    }
    if system == "dsv3":
        result["activation_checkpointing"] = args.activation_checkpointing
        result["loss_chunk_tokens"] = args.loss_chunk
        result["sdpa_pad_v"] = args.pad_v
        result["fp8"] = args.fp8
    else:
        result["attn_implementation"] = model.config._attn_implementation
        result["experts_implementation"] = getattr(model.config, "_experts_implementation", None)
    return result


class _Enough(Exception):
    """Raised from the trainer's record callback once the timed steps are logged: stops `fit` there."""


def _write_random_shards(directory: Path, vocab_size: int, windows: int, seq: int, seed: int) -> Path:
    """A token shard of uniformly random ids, enough for `windows` training windows of `seq` tokens."""
    rng = np.random.default_rng(seed)
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
    with IndexedDatasetWriter(directory / "shard_00000", dtype) as writer:
        for _ in range(windows + 1):
            writer.add_document(rng.integers(0, vocab_size, seq + 1, dtype=np.int64).astype(dtype))
    return directory


def _trainer_precision(param_dtype: str, device: torch.device) -> str:
    if param_dtype == "bfloat16" or (param_dtype == "auto" and device.type == "cuda"):
        autocast = " + bf16 autocast" if device.type == "cuda" else ""
        return "bf16 weights, fp32 masters in the optimizer" + autocast
    return "fp32 master + bf16 autocast" if device.type == "cuda" else "fp32"


def _trainer_step(cfg: ModelConfig, args, device: torch.device) -> dict:
    """Time `dsv3 train`'s own loop: the Trainer's fit() on the preset's run config with `cfg` (the model
    every system runs), stopped after the timed steps. Its records (one per step) give the tokens/s and
    MFU its progress line prints."""
    from dsv3.train.trainer import Trainer

    steps = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as tmp:
        windows = steps * args.batch + 8
        shards = _write_random_shards(Path(tmp) / "train", cfg.vocab_size, windows, args.seq, args.seed)
        overrides = [
            f"data.train=[{shards}]", "data.valid=[]", "data.tokenizer=null", f"train.output_dir={tmp}/run",
            f"train.steps={steps + 1000}", f"train.global_batch_size={args.batch}",
            f"train.micro_batch_size={args.micro_batch or args.batch}", f"train.seq_len={args.seq}",
            "train.log_every=1", "train.eval_every=100000", "train.save_every=100000",
            "train.tensorboard=false",
            f"train.device={device.type}",
            f"train.compile={(args.compile_scope if args.compile else 'false')}",
            f"train.activation_checkpointing={str(args.activation_checkpointing).lower()}",
            f"train.loss_chunk_tokens={args.loss_chunk}", f"train.seed={args.seed}",
            f"train.optimizer_state_dtype={args.moments}", f"train.param_dtype={args.param_dtype}",
            f"train.fp8={str(args.fp8).lower()}",
            # one GPU, whatever layout the preset plans for
            "parallel.gpus=1", "parallel.dp_replicate=1", "parallel.dp_shard=1", "parallel.ep=1",
            "parallel.tp=1", "parallel.pp=1",
        ]
        if not args.mtp:
            overrides.append("train.mtp_lambda=0")
        run = load_run_config(args.preset, overrides).model_copy(update={"model": cfg})
        records: list[dict] = []
        precision: list[str] = []

        def collect(record: dict) -> None:
            if "precision" in record:  # the run's header: what param_dtype and the moments resolved to
                precision.append(record["precision"])
            if record["kind"] in ("train", "skip"):
                records.append(record)
                if len(records) == steps:
                    raise _Enough

        _reset_memory(device)
        trainer = Trainer(run, on_record=collect)
        with contextlib.suppress(_Enough):
            trainer.fit()
        if args.profile:
            _profile(f"{args.profile}.trainer", trainer.train_step, device)
    timed = records[args.warmup:]
    rates = [r["tokens_per_s"] for r in timed]
    mfus = [r["mfu"] for r in timed if r.get("mfu") is not None]
    return {
        "dtype": _trainer_precision(args.param_dtype, device),
        "compiled": args.compile and args.compile_scope,
        "steps": len(timed),
        "micro_batch": run.train.micro_batch_size,
        "tokens_per_s": round(statistics.median(rates), 1),
        "step_ms_median": round(1e3 * args.batch * args.seq / statistics.median(rates), 2),
        "mfu": round(statistics.median(mfus), 4) if mfus else None,
        "mfu_formula": round(statistics.median(rates) * _flops_per_token("trainer", run.model, args)
                             / (DEFAULT_PEAK_TFLOPS * 1e12), 4),
        "peak_memory_gb": _peak_memory(device),
        "params": sum(p.numel() for p in trainer.model.parameters()),
        "loss_first": round(records[0]["loss"], 4),
        "loss_last": round(records[-1]["loss"], 4),
        "skipped_steps": sum(r["kind"] == "skip" for r in records),
        "activation_checkpointing": args.activation_checkpointing,
        "loss_chunk_tokens": args.loss_chunk,
        "optimizer_moments": args.moments,
        "param_dtype": args.param_dtype,
        "precision": precision[0] if precision else None,
        "fp8": args.fp8,
    }


def _yarn(cfg: ModelConfig, seq: int) -> RopeScaling:
    """YaRN scaling that stretches the preset's trained context to `seq` (DeepSeek-V3's mscale settings)."""
    trained = cfg.max_position_embeddings
    return RopeScaling(factor=seq / trained, original_max_position_embeddings=trained, mscale=1.0,
                       mscale_all_dim=1.0)


def _flops_per_token(system: str, cfg: ModelConfig, args) -> float:
    flops = training_flops_per_token(cfg, args.seq)
    return flops.total if (system in ("dsv3", "trainer") and args.mtp) else flops.without_mtp


def _profile(path: str, step: Callable[[], object], device: torch.device) -> None:
    """3 steps' kernel table to PATH.txt; on a GPU their trace to PATH.json and its summary printed."""
    trace = f"{path}.json" if device.type == "cuda" else None
    write_kernel_table(f"{path}.txt", step, trace=trace)
    if trace:
        print(json.dumps({"trace": path, **summarize(Path(trace), 3)}), flush=True)


def _reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if device.type == "cuda" else None


def _run(system: str, cfg: ModelConfig, args, device: torch.device) -> dict:
    head = {
        "system": system,
        "preset": args.preset,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batch": args.batch,
        "seq": args.seq,
    }
    if system == "trainer":
        result = _trainer_step(cfg, args, device)
    else:
        result = _model_step(system, cfg, args, device)
    return {**head, **result, "sdpa": args.sdpa}


def main() -> None:
    args = _parse()
    device = torch.device(args.device)
    attention.SDPA_PAD_V = {"auto": None, "yes": True, "no": False}[args.pad_v]
    cfg = load_model_config(args.preset)
    if args.seq > cfg.max_position_embeddings:  # long context: every system gets the same YaRN scaling
        yarn = _yarn(cfg, args.seq)
        cfg = cfg.model_copy(update={"rope_scaling": yarn, "max_position_embeddings": args.seq})
    if not args.mtp:  # neither system trains MTP: don't let dsv3 carry its unused parameters
        cfg = cfg.model_copy(update={"num_nextn_predict_layers": 0})
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        _select_sdpa(args.sdpa)
    results = {}
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if unknown := set(systems) - set(SYSTEMS):
        raise SystemExit(f"--systems: unknown {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    for system in systems:
        results[system] = _run(system, cfg, args, device)
        gc.collect()  # the model and optimizer of _run are garbage now: free them for the next system
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps(results[system]), flush=True)
    if "hf" in results:
        print(json.dumps(_summary(results)), flush=True)


def _summary(results: dict[str, dict]) -> dict:
    """dsv3's systems over compiled (and eager) transformers, and the issue's targets for the trainer."""
    def ratio(ours: str, theirs: str, key: str) -> float | None:
        a, b = results.get(ours, {}).get(key), results.get(theirs, {}).get(key)
        return round(a / b, 3) if a is not None and b else None

    out: dict = {"baseline": "hf (transformers, torch.compile)"}
    for ours in ("trainer", "dsv3"):
        if ours in results:
            out[ours] = {
                "tokens_per_s_over_hf": ratio(ours, "hf", "tokens_per_s"),
                "tokens_per_s_over_hf_eager": ratio(ours, "hf-eager", "tokens_per_s"),
                "peak_memory_over_hf": ratio(ours, "hf", "peak_memory_gb"),
            }
    if "trainer" in results:
        t = out["trainer"]
        out["target"] = "trainer: MFU >= 0.40 and tokens/s >= 2.0x hf at <= hf's peak memory"
        out["target_met"] = bool(
            (results["trainer"]["mfu"] or 0) >= 0.40 and (t["tokens_per_s_over_hf"] or 0) >= 2.0
            and (t["peak_memory_over_hf"] or 0) <= 1.0
        )
    return out


if __name__ == "__main__":
    main()
