"""One training step (forward + backward + fused AdamW) of dsv3 vs transformers' DeepseekV3ForCausalLM.

Same config, same batch, same loss targets, same optimizer, in the same process; prints one JSON
line per system (tokens/s, MFU, peak memory) and a last line with the ratios.

    python benchmarks/train_step.py --preset small --batch 8 --seq 2048 --compile      # one H100
    python benchmarks/train_step.py --device cpu --preset tiny --batch 2 --seq 64 --steps 2  # smoke

MFU counts 6·N_active + causal attention FLOPs per token (dsv3.scaling.training_flops_per_token)
over 989 TFLOP/s (H100 SXM dense bf16). Both systems skip MTP (transformers does not train it)
unless --mtp, which adds dsv3's MTP loss and its FLOPs to dsv3 alone.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from collections.abc import Callable

import torch

from dsv3.config import ModelConfig, load_model_config
from dsv3.model import Transformer, attention
from dsv3.scaling import DEFAULT_PEAK_TFLOPS, training_flops_per_token


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="model preset or YAML (configs/)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--device", default="cuda")
    p.add_argument(
        "--dtype",
        choices=["bf16", "amp"],
        default="bf16",
        help="bf16: bf16 parameters and optimizer state; amp: fp32 parameters + bf16 autocast",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile dsv3's blocks (fullgraph)")
    p.add_argument("--compile-hf", action="store_true", help="torch.compile transformers' model too")
    p.add_argument("--activation-checkpointing", action="store_true", help="dsv3 recomputes each block")
    p.add_argument("--mtp", action="store_true", help="dsv3 also trains its MTP depth(s), λ=0.3")
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
    p.add_argument("--profile", metavar="PATH", help="after timing, profile 3 steps; kernel table to PATH")
    p.add_argument("--systems", default="dsv3,hf", help="comma-separated: dsv3, hf")
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
    if args.compile:
        model.compile_blocks()
    mtp_lambda = 0.3 if args.mtp else 0.0

    def loss_fn(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return model.forward_with_losses(ids, labels, mtp_lambda=mtp_lambda, return_logits=False).loss

    def after_step() -> None:
        model.update_bias(1e-3)  # part of dsv3's real step: aux-loss-free balancing

    loss_fn.after_step = after_step
    return model, loss_fn


def _build_hf(cfg: ModelConfig, args, device: torch.device) -> tuple[torch.nn.Module, Callable]:
    import transformers

    torch.manual_seed(args.seed)
    with torch.device(device):
        model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**cfg.to_hf_dict()))
    forward = torch.compile(model) if args.compile_hf else model

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


def _profile(path: str, step: Callable, n_steps: int = 3) -> None:
    """The kernels of `n_steps` steps, by total GPU time, as torch.profiler's table."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(n_steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    table = prof.key_averages().table(
        sort_by="self_device_time_total", row_limit=45, max_name_column_width=90
    )
    with open(path, "w") as f:
        f.write(f"{n_steps} steps\n{table}\n")


def _select_sdpa(choice: str) -> None:
    """Leave only one fused SDPA backend enabled (math stays as the last resort torch falls back to)."""
    if choice == "auto":
        return
    torch.backends.cuda.enable_flash_sdp(choice == "flash")
    torch.backends.cuda.enable_cudnn_sdp(choice == "cudnn")
    torch.backends.cuda.enable_mem_efficient_sdp(choice == "efficient")


def _run(system: str, cfg: ModelConfig, args, device: torch.device) -> dict:
    build = {"dsv3": _build_dsv3, "hf": _build_hf}[system]
    model, loss_fn = build(cfg, args, device)
    if args.dtype == "bf16":
        model.to(torch.bfloat16)  # dsv3 keeps its router bias and rope frequencies in fp32 regardless
    model.train()
    fused = device.type in ("cuda", "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=fused)
    gen = torch.Generator().manual_seed(args.seed)
    data = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen).to(device)
    ids, labels = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.dtype == "amp")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

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
        _profile(f"{args.profile}.{system}.txt", lambda: _step(loss_fn, ids, labels, optimizer, autocast))
    tokens = args.batch * args.seq
    tokens_per_s = tokens * len(seconds) / sum(seconds)
    flops = training_flops_per_token(cfg, args.seq)
    flops_per_token = flops.total if (system == "dsv3" and args.mtp) else flops.without_mtp
    result = {
        "system": system,
        "preset": args.preset,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "compiled": args.compile if system == "dsv3" else args.compile_hf,
        "batch": args.batch,
        "seq": args.seq,
        "steps": len(seconds),
        "tokens_per_s": round(tokens_per_s, 1),
        "step_ms_median": round(1e3 * statistics.median(seconds), 2),
        "mfu": round(tokens_per_s * flops_per_token / (DEFAULT_PEAK_TFLOPS * 1e12), 4),
        "flops_per_token": flops_per_token,
        "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
        if device.type == "cuda"
        else None,
        "params": sum(p.numel() for p in model.parameters()),
        "loss_first": round(losses[0].item(), 4),
        "loss_last": round(losses[-1].item(), 4),
    }
    if system == "hf":
        result["attn_implementation"] = model.config._attn_implementation
        result["experts_implementation"] = getattr(model.config, "_experts_implementation", None)
    else:
        result["activation_checkpointing"] = args.activation_checkpointing
        result["sdpa_pad_v"] = args.pad_v
    result["sdpa"] = args.sdpa
    return result


def main() -> None:
    args = _parse()
    device = torch.device(args.device)
    attention.SDPA_PAD_V = {"auto": None, "yes": True, "no": False}[args.pad_v]
    cfg = load_model_config(args.preset)
    if not args.mtp:  # neither system trains MTP: don't let dsv3 carry its unused parameters
        cfg = cfg.model_copy(update={"num_nextn_predict_layers": 0})
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        _select_sdpa(args.sdpa)
    results = {}
    for system in [s.strip() for s in args.systems.split(",") if s.strip()]:
        results[system] = _run(system, cfg, args, device)
        gc.collect()  # the model and optimizer of _run are garbage now: free them for the next system
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps(results[system]), flush=True)
    if {"dsv3", "hf"} <= results.keys():
        ours, theirs = results["dsv3"], results["hf"]
        ratio = {"tokens_per_s": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3)}
        if ours["peak_memory_gb"] is not None:
            ratio["peak_memory"] = round(ours["peak_memory_gb"] / theirs["peak_memory_gb"], 3)
        met = ratio["tokens_per_s"] >= 2.5 and ratio.get("peak_memory", 1.0) <= 1.0
        print(
            json.dumps(
                {
                    "ratio_dsv3_over_hf": ratio,
                    "target": "tokens/s >= 2.5x at <= 1.0x peak memory",
                    "target_met": met,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
