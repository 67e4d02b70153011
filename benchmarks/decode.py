"""Greedy generation speed: dsv3's latent-cache decoder vs transformers' DeepseekV3ForCausalLM.generate.

Same config, same weights (dsv3's init, the output head scaled up so that greedy choices are not
near-ties; handed to transformers through save_hf/from_pretrained), same prompts, same process.
For each batch size and system one JSON line: prefill time, decode ms/token (one step for the
whole batch), tokens/s over the whole call, the generation's own GPU memory (cache + activations,
weights excluded); then one line of ratios per batch size.

    python benchmarks/decode.py --preset small --batch 1,32 --prompt-len 128 --new-tokens 128   # H100
    python benchmarks/decode.py --device cpu --preset tiny --batch 1,4 --prompt-len 16 --new-tokens 8

Systems: `dsv3` (eager decode), `dsv3-graph` (the decode step captured in a CUDA graph once per
call, capture time included), `dsv3-graph-compiled` (the same with every decoder block through
torch.compile first: `generate(compile=True)`; the warm-up calls compile), `hf` (transformers'
generate: DynamicCache, SDPA attention, its default grouped_mm experts), `hf-static` (transformers'
strongest generate: `cache_implementation="static"`, which compiles its decode step; GPU only by
default). Ratios are given against both.
bf16 on CUDA, fp32 on CPU. `same_tokens_as` compares greedy tokens with the first system: 1.0 in
fp32; in bf16 two implementations' greedy paths may split at a near-tie.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dsv3.config import ModelConfig, load_model_config
from dsv3.infer import generate
from dsv3.model import Transformer
from dsv3.model.hf import save_hf

SYSTEMS = ("dsv3", "dsv3-graph", "dsv3-graph-compiled", "hf", "hf-static")
GRAPHED = ("dsv3-graph", "dsv3-graph-compiled")  # CUDA graphs: GPU only


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="model preset or YAML (configs/)")
    p.add_argument("--batch", default="1,32", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument(
        "--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on cuda, fp32 on cpu"
    )
    p.add_argument("--systems", default=None, help=f"comma-separated of {','.join(SYSTEMS)} (default: all)")
    p.add_argument(
        "--fp8-cache", action="store_true", help="dsv3 stores the latent as e4m3 + per-token scales"
    )
    p.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (the fastest counts)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.batches = [int(b) for b in args.batch.split(",")]
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    systems = args.systems.split(",") if args.systems else [s for s in SYSTEMS if s not in GRAPHED]
    if args.systems is None and args.device != "cuda":
        systems.remove("hf-static")  # transformers compiles the static-cache decode step: a GPU baseline
    if args.systems is None and args.device == "cuda":
        systems[1:1] = GRAPHED
    if unknown := set(systems) - set(SYSTEMS):
        p.error(f"--systems: unknown {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    if set(GRAPHED) & set(systems) and args.device != "cuda":
        p.error(f"--systems {', '.join(GRAPHED)} need --device cuda")
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be ≥ 1 and --warmup ≥ 0")
    if args.new_tokens < 2:
        p.error("--new-tokens must be ≥ 2 (decode time is the total minus a one-token call)")
    args.systems = systems
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(cfg: ModelConfig, args, device: torch.device, dtype: torch.dtype) -> dict[str, Callable]:
    """system → fn(prompts, n_new) returning the new tokens (B, n_new), all on the same weights."""
    ours = Transformer(cfg, seed=args.seed)
    with torch.no_grad():  # decisive logits (std ≈ 5, not ≈ 0.2), so greedy paths are comparable
        ours.lm_head.weight.mul_(25)
    ours = ours.to(device=device, dtype=dtype).eval()
    fns: dict[str, Callable] = {}
    for name, graph, compiled in (("dsv3", False, False), ("dsv3-graph", True, False),
                                  ("dsv3-graph-compiled", True, True)):
        if name in args.systems:
            fns[name] = lambda ids, n, g=graph, c=compiled: generate(
                ours, ids, n, fp8_cache=args.fp8_cache, cuda_graph=g, compile=c)
    if {"hf", "hf-static"} & set(args.systems):
        import transformers

        with tempfile.TemporaryDirectory() as tmp:
            save_hf(ours, Path(tmp) / "model", dtype=dtype)
            hf = transformers.DeepseekV3ForCausalLM.from_pretrained(Path(tmp) / "model", dtype=dtype)
            hf = hf.to(device).eval()

        def hf_generate(ids: torch.Tensor, n: int, cache: str | None) -> torch.Tensor:
            # cache "static": transformers preallocates the cache and compiles its decode step, its
            # fastest generate; None: the default DynamicCache.
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
                eos_token_id=None,
                cache_implementation=cache,
            )
            return out[:, ids.shape[1] :]

        for name, cache in (("hf", None), ("hf-static", "static")):
            if name in args.systems:
                fns[name] = lambda ids, n, c=cache: hf_generate(ids, n, c)
    return fns


def _timed(fn: Callable, ids: torch.Tensor, n: int, args, device: torch.device) -> tuple[float, torch.Tensor]:
    """Seconds of the fastest of `repeats` calls (the least disturbed), after `warmup` calls; the output."""
    for _ in range(args.warmup):
        fn(ids, n)
    seconds, out = [], None
    for _ in range(args.repeats):
        _sync(device)
        start = time.perf_counter()
        out = fn(ids, n)
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return min(seconds), out


def _measure(
    system: str, fn: Callable, ids: torch.Tensor, args, device: torch.device
) -> tuple[dict, torch.Tensor]:
    B, n = ids.shape[0], args.new_tokens
    prefill_s, _ = _timed(fn, ids, 1, args, device)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    total_s, tokens = _timed(fn, ids, n, args, device)
    if tokens.shape != (B, n):
        raise RuntimeError(f"{system}: generated {tuple(tokens.shape)} tokens, expected {(B, n)}")
    decode_s = max(total_s - prefill_s, 1e-9)
    row = {
        "system": system,
        "preset": args.preset,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "kv_cache": ("fp8" if args.fp8_cache else args.dtype) if system.startswith("dsv3") else args.dtype,
        "batch": B,
        "prompt_len": ids.shape[1],
        "new_tokens": n,
        "prefill_ms": round(prefill_s * 1e3, 3),
        "decode_ms_per_token": round(decode_s * 1e3 / (n - 1), 3),
        "decode_tokens_per_s": round(B * (n - 1) / decode_s, 1),
        "tokens_per_s": round(B * n / total_s, 1),
        "total_s": round(total_s, 4),
    }
    if device.type == "cuda":
        row["generation_mem_gb"] = round((torch.cuda.max_memory_allocated(device) - base) / 1e9, 3)
    return row, tokens


def main() -> None:
    args = _parse()
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    # generation never runs the MTP module, and transformers would not load it
    cfg = load_model_config(args.preset).model_copy(update={"num_nextn_predict_layers": 0})
    fns = _build(cfg, args, device, dtype)
    gen = torch.Generator().manual_seed(args.seed)
    for B in args.batches:
        ids = torch.randint(0, cfg.vocab_size, (B, args.prompt_len), generator=gen).to(device)
        rows, first_tokens = {}, None
        for system, fn in fns.items():
            try:
                row, tokens = _measure(system, fn, ids, args, device)
            except (
                Exception
            ) as err:  # one failing system (e.g. a CUDA-graph capture) must not hide the others
                print(
                    json.dumps({"system": system, "batch": B, "error": f"{type(err).__name__}: {err}"}),
                    flush=True,
                )
                continue
            if first_tokens is None:
                first_tokens, first = tokens, system
            row["same_tokens_as"] = {first: round((tokens == first_tokens).float().mean().item(), 4)}
            rows[system] = row
            print(json.dumps(row), flush=True)
        ratios = {
            f"{s}/{ref}": {
                "tokens_per_s": round(r["tokens_per_s"] / rows[ref]["tokens_per_s"], 2),
                "decode_speedup": round(rows[ref]["decode_ms_per_token"] / r["decode_ms_per_token"], 2),
            }
            for ref in ("hf-static", "hf")
            if ref in rows
            for s, r in rows.items()
            if s.startswith("dsv3")
        }
        if ratios:
            print(json.dumps({"batch": B, "ratios": ratios}), flush=True)


if __name__ == "__main__":
    main()
