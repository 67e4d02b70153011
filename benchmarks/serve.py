"""Serving speed: the engine under offered load, against the static-batch decoder and transformers.

One process, one set of weights (dsv3's init with the output head scaled up so that greedy choices
are not near-ties; handed to transformers through save_hf/from_pretrained), random prompts. JSON
lines, one per measurement:

- `prefix_cache`: time to first token of a request whose long system prompt is in the prefix cache
  (warm) against the same request without prefix caching (cold); median of --repeats.
- `speculative`: the engine at concurrency 1 with and without MTP speculative decoding (one drafted
  token a step): output tokens/s, acceptance rate, speedup, and whether greedy tokens are identical.
  Random weights draft at chance (acceptance ≈ 1/vocab): pass --checkpoint with a trained model
  (and its tokenizer) for a meaningful figure. Where greedy tokens differ, a `speculative_differences`
  line gives each differing prompt's first parting token and the two tokens' logit gap under the
  same weights in float32 (near-ties: rounding; see `_first_differences`).
- `score`: prompt logprobs, what `echo` + `logprobs` (lm-eval's `local-completions`) asks the server
  for: --score-requests random prompts of --prompt-len tokens scored by the engine (one new token
  each, 64 in flight), against the same model's batched forward (64 prompts a batch, log-softmax in
  float32 at every position); prompt tokens scored a second by each and their largest difference.
- `step`: for each concurrency C, the engine's decode step function (its CUDA graph on a GPU)
  replayed back to back: the device time of a step, against the engine's TPOT at C; at C = 1 also
  the speculative engine's fused step (two tokens verified, the next drafted).
- `load`: for each offered concurrency C, C clients each sending a request as soon as their last
  one finished (closed loop, --requests-per-client each): output tokens/s, TTFT and TPOT
  percentiles. Systems: `dsv3-engine` (continuous batching, paged cache, CUDA graphs per shape),
  `dsv3-engine-sync` (the same engine reading every step back before scheduling the next: no
  overlap of the host's work with the GPU's),
  `dsv3-generate` (dsv3.infer.generate: one static batch of C prompts, its decode step captured in
  a CUDA graph), `hf-static` (transformers' generate with cache_implementation="static", which
  compiles its decode step: the strongest transformers setup; GPU only, at --hf-concurrency since
  each batch size compiles anew). A static batch gives every request the same TTFT (its prefill) and
  TPOT (its decode step); then one line of ratios.

    python benchmarks/serve.py --preset small                        # an H200: about 5 minutes
    python benchmarks/serve.py --device cpu --preset tiny --concurrency 1,8 --new-tokens 16 --prompt-len 32
    python benchmarks/serve.py --preset small --parts speculative --checkpoint runs/gpu/step_008000

bf16 on CUDA, fp32 on CPU. Each engine measurement runs its workload once untimed first, so the CUDA
graphs of the shapes it needs are captured before timing (capture time is reported separately).
With --profile, every profile runs after every timing of the process: torch's profiler leaves CUPTI
attached to the process, which slows each later launch (on the H200 a speculative step timed after
the plain engine's profile took 1.79 ms, 1.21 ms in a process never profiled).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from dsv3.config import load_model_config
from dsv3.infer import generate
from dsv3.infer.engine import EngineConfig, LLMEngine
from dsv3.infer.sampling import SamplingParams
from dsv3.model import Transformer
from dsv3.model.hf import load_hf, save_hf
from kernel_table import write_host_table, write_kernel_table
from trace_summary import summarize

PARTS = ("prefix", "speculative", "load", "step", "score")
SYSTEMS = ("dsv3-engine", "dsv3-engine-sync", "dsv3-generate", "hf-static")
ENGINES = {"dsv3-engine": {}, "dsv3-engine-sync": {"async_scheduling": False}}  # EngineConfig options


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="model preset or YAML (configs/)")
    p.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated of {','.join(PARTS)}")
    p.add_argument("--systems", default=None, help=f"load systems, of {','.join(SYSTEMS)} (default: all)")
    p.add_argument("--concurrency", default="1,32,128,256", help="offered concurrency levels")
    p.add_argument(
        "--hf-concurrency",
        default="1,32",
        help="levels at which hf-static runs (it compiles once per batch size: minutes each)",
    )
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prefix-len", type=int, default=1024, help="shared system prompt (prefix part)")
    p.add_argument("--suffix-len", type=int, default=32, help="each request's own tokens after it")
    p.add_argument("--repeats", type=int, default=5, help="prefix part: requests timed")
    p.add_argument("--score-requests", type=int, default=512, help="score part: prompts scored")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="the model's weights (default: bfloat16 on a GPU, float32 on a CPU)")
    p.add_argument("--no-compile", action="store_true",
                   help="the engine captures its step functions without torch.compile (EngineConfig.compile)")
    p.add_argument("--checkpoint", help="speculative part: a trained checkpoint with MTP and its tokenizer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--profile", metavar="PATH",
        help="after every part's timings: step part: the kernels of 20 decode steps at each C to "
             "PATH.cC.txt and the host's Python of serving C more requests to PATH.cC.host.txt; prefix "
             "part: the kernels and host table of cold and warm requests, PATH.prefix-*.txt; "
             "speculative part: one request's, PATH.speculative-{plain,mtp}*.txt",
    )  # fmt: skip
    args = p.parse_args()
    args.parts = args.parts.split(",")
    args.levels = [int(c) for c in args.concurrency.split(",")]
    args.hf_levels = {int(c) for c in args.hf_concurrency.split(",")}
    systems = args.systems.split(",") if args.systems else list(SYSTEMS)
    if args.systems is None and args.device != "cuda":
        systems.remove("hf-static")  # transformers compiles its static-cache decode step on a GPU only
    if bad := (set(systems) - set(SYSTEMS)) | (set(args.parts) - set(PARTS)):
        p.error(f"unknown {sorted(bad)}")
    args.systems = systems
    default = "bfloat16" if args.device == "cuda" else "float32"
    args.dtype = getattr(torch, args.dtype or default)
    return args


def _emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3, 3)

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99)}


_MODELS: dict[bool, Transformer] = {}


def _model(args, mtp: bool) -> Transformer:
    """The benchmark's random model (built once per MTP setting: initialising `small` takes a while)."""
    if mtp not in _MODELS:
        cfg = load_model_config(args.preset)
        if not mtp:
            cfg = cfg.model_copy(update={"num_nextn_predict_layers": 0})
        model = Transformer(cfg, seed=args.seed)
        with torch.no_grad():  # decisive logits (std ≈ 5, not ≈ 0.2): greedy paths comparable across systems
            model.lm_head.weight.mul_(25)
        _MODELS[mtp] = model.to(device=args.device, dtype=args.dtype).eval()
    return _MODELS[mtp]


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=gen).tolist()


def _engine(model, args, max_num_seqs: int, max_len: int, **options) -> tuple[LLMEngine, float]:
    """An engine with a cache sized for its load (the process holds other systems' memory too),
    with what start-up made frozen out of the garbage collector's passes as `dsv3 serve` does; the
    engines made before it (deleted by then) are unfrozen and collected first."""
    gc.unfreeze()
    gc.collect()
    start = time.perf_counter()
    blocks = max_num_seqs * (-(-(max_len + 1) // 64)) + 64
    config = EngineConfig(
        max_num_seqs=max_num_seqs,
        max_model_len=max_len,
        num_blocks=blocks,
        kv_cache_dtype=args.kv_cache_dtype,
        compile=False if args.no_compile else None,
        **options,
    )
    engine = LLMEngine(model, None, config)
    seconds = time.perf_counter() - start
    gc.collect()
    gc.freeze()
    return engine, seconds


def _drive(engine: LLMEngine, prompts: list[list[int]], concurrency: int, params: SamplingParams) -> dict:
    """Closed loop: `concurrency` requests in flight until every prompt has been served."""
    pending, in_flight, done = list(enumerate(prompts)), 0, {}
    start = time.perf_counter()
    while pending or engine.has_unfinished_requests():
        while pending and in_flight < concurrency:
            i, p = pending.pop(0)
            engine.add_request(str(i), p, params)
            in_flight += 1
        for out in engine.step():
            if out.finished:
                in_flight -= 1
                done[int(out.request_id)] = out
    wall = time.perf_counter() - start
    outs = [done[i] for i in range(len(prompts))]
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    ttft = [o.first_token_time - o.arrival_time for o in outs]
    tpot = [
        (o.finish_time - o.first_token_time) / (len(o.outputs[0].token_ids) - 1)
        for o in outs
        if len(o.outputs[0].token_ids) > 1
    ]
    return {"outputs": outs, "wall_s": wall, "tokens": tokens, "ttft": ttft, "tpot": tpot}


def _drive_each(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> None:
    """Serve these prompts one after the other (a profile's window of single requests)."""
    for prompt in prompts:
        _drive(engine, [prompt], 1, params)


def _profile(path: str, kernels: Callable, host: Callable, n_steps: int = 1, summary: dict | None = None,
             new_tokens: int = 1) -> None:  # fmt: skip
    """`n_steps` calls of `kernels` profiled to PATH.txt and one of `host` to PATH.host.txt. With
    `summary` (a JSON line's first fields), on a GPU also the Chrome trace, summarised per output
    token of the profiled call (`new_tokens`) as that line."""
    trace = f"{path}.json" if summary is not None and torch.cuda.is_available() else None
    with torch.no_grad():
        write_kernel_table(f"{path}.txt", kernels, n_steps=n_steps, trace=trace)
    write_host_table(f"{path}.host.txt", host)
    if trace:  # per output token: where the host and the GPU spend a request
        _emit({**summary, "per": "output token", **summarize(Path(trace), new_tokens)})


# --- parts ---------------------------------------------------------------------------------------------


def prefix_part(args) -> None:
    """TTFT of a request whose system prompt is cached, against the same request computed cold."""
    model = _model(args, mtp=False)
    vocab = model.config.vocab_size
    system = _prompts(1, args.prefix_len, vocab, args.seed + 1)[0]
    suffixes = _prompts(args.repeats + 1, args.suffix_len, vocab, args.seed + 2)
    max_len = args.prefix_len + args.suffix_len + 8
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    ttft = {}
    for name, caching in (("cold", False), ("warm", True)):
        engine, _ = _engine(model, args, 4, max_len, enable_prefix_caching=caching)
        _drive(
            engine, [_prompts(1, len(system) + args.suffix_len, vocab, 99)[0]], 1, params
        )  # graphs, warm-up
        _drive(engine, [system + suffixes[0]], 1, params)  # caches the system prompt (when caching)
        runs = [_drive(engine, [system + s], 1, params) for s in suffixes[1:]]
        ttft[name] = statistics.median(r["ttft"][0] for r in runs)
        cached = runs[-1]["outputs"][0].num_cached_tokens
        if args.profile:  # 5 more requests of this kind: their kernels, and the host's Python
            more = [system + s for s in _prompts(6, args.suffix_len, vocab, args.seed + 3)]
            path = f"{args.profile}.prefix-{name}"
            args.profiles.append(partial(_profile, path, partial(_drive_each, engine, more[:5], params),
                                         partial(_drive_each, engine, more[5:], params)))
        del engine
    _emit(
        {
            "bench": "prefix_cache",
            "prefix_tokens": args.prefix_len,
            "suffix_tokens": args.suffix_len,
            "cached_tokens": cached,
            "ttft_cold_ms": round(ttft["cold"] * 1e3, 3),
            "ttft_warm_ms": round(ttft["warm"] * 1e3, 3),
            "speedup": round(ttft["cold"] / ttft["warm"], 2),
        }
    )


def score_part(args) -> None:
    """Prompt logprobs through the engine against one batched forward of the model (module docstring)."""
    model = _model(args, mtp=False)
    prompts = _prompts(args.score_requests, args.prompt_len, model.config.vocab_size, args.seed + 4)
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    engine, _ = _engine(model, args, 64, args.prompt_len + 8)
    _drive(engine, prompts[:64], 64, params)  # graphs, warm-up
    run = _drive(engine, prompts, 64, params)
    got = torch.tensor([o.prompt_logprobs[1:] for o in run["outputs"]])
    device = torch.device(args.device)

    def forward() -> torch.Tensor:
        rows = []
        with torch.no_grad():
            for i in range(0, len(prompts), 64):
                ids = torch.tensor(prompts[i : i + 64], device=device)
                lp = model(ids)[:, :-1].float().log_softmax(-1)
                rows.append(lp.gather(2, ids[:, 1:, None]).squeeze(2).cpu())
        return torch.cat(rows)

    forward()  # warm-up
    _sync(device)
    start = time.perf_counter()
    want = forward()
    seconds = time.perf_counter() - start
    scored = got.numel()
    _emit(
        {
            "bench": "score",
            "prompts": len(prompts),
            "prompt_tokens": args.prompt_len,
            "engine_tokens_per_s": round(scored / run["wall_s"], 1),
            "forward_tokens_per_s": round(scored / seconds, 1),
            "engine_vs_forward": round(seconds / run["wall_s"], 3),
            "max_abs_diff": round(float((got - want).abs().max()), 5),
            "mean_abs_diff": round(float((got - want).abs().mean()), 6),
        }
    )


def speculative_part(args) -> None:
    """The engine at concurrency 1 with and without MTP drafts."""
    if args.checkpoint:
        from dsv3.checkpoints import checkpoint_tokenizer, resolve_checkpoint
        from dsv3.infer.tokenizer import TextTokenizer

        directory = resolve_checkpoint(args.checkpoint, "best")
        model = load_hf(directory, dtype=args.dtype, device=args.device).eval()
        tok = TextTokenizer.load(checkpoint_tokenizer(directory))
        texts = [
            "import os\nimport sys\n\n",
            "def parse_args(argv):\n    ",
            "class Config:\n    def __init__(self",
            "    for i in range(len(",
            'if __name__ == "__main__":\n',
            "# Copyright (c) ",
        ]
        prompts = [tok.encode_prompt(t) for t in texts]
        warm = [tok.encode_prompt("from collections import")]
        source = str(directory)
    else:
        model = _model(args, mtp=True)
        prompts = _prompts(6, args.prompt_len, model.config.vocab_size, args.seed + 3)
        warm = _prompts(1, args.prompt_len, model.config.vocab_size, args.seed + 4)
        source = "random weights"
    if not model.config.num_nextn_predict_layers:
        _emit({"bench": "speculative", "error": f"{source}: no MTP module"})
        return
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    max_len = max(len(p) for p in prompts) + args.new_tokens + 2
    rows = {}
    for spec in (0, 1):
        engine, _ = _engine(model, args, 1, max_len, speculative_tokens=spec)
        _drive(engine, warm, 1, params)  # graphs, warm-up (another prompt: no prefix hit in the timed ones)
        rows[spec] = _drive(engine, prompts, 1, params)
        rows[spec]["acceptance"] = engine.stats.acceptance_rate
        if args.profile:  # one request's kernels and host Python, plain and speculative side by side
            path = f"{args.profile}.speculative-{'mtp' if spec else 'plain'}"
            args.profiles.append(partial(
                _profile, path, partial(_drive, engine, prompts[:1], 1, params),
                partial(_drive, engine, prompts[1:2], 1, params),
                summary={"bench": "speculative_trace", "mtp": bool(spec)}, new_tokens=args.new_tokens,
            ))  # fmt: skip
        del engine
    same = sum(
        a.outputs[0].token_ids == b.outputs[0].token_ids
        for a, b in zip(rows[0]["outputs"], rows[1]["outputs"], strict=True)
    ) / len(prompts)
    tps = {k: r["tokens"] / r["wall_s"] for k, r in rows.items()}
    _emit(
        {
            "bench": "speculative",
            "model": source,
            "concurrency": 1,
            "requests": len(prompts),
            "new_tokens": args.new_tokens,
            "tokens_per_s_plain": round(tps[0], 1),
            "tokens_per_s_mtp": round(tps[1], 1),
            "speedup": round(tps[1] / tps[0], 3),
            "acceptance_rate": round(rows[1]["acceptance"] or 0.0, 4),
            "tpot_ms_plain": _percentiles(rows[0]["tpot"]),
            "tpot_ms_mtp": _percentiles(rows[1]["tpot"]),
            "same_greedy_tokens": same,
        }
    )
    if same < 1:  # its own line, after the figures: it builds a float32 copy of the model
        splits = _first_differences(model, prompts, rows[0]["outputs"], rows[1]["outputs"])
        _emit({"bench": "speculative_differences", "model": source, "first_differences": splits})


@torch.no_grad()
def _first_differences(model, prompts: list[list[int]], plain: list, spec: list) -> list[dict]:
    """Where greedy decoding with and without speculation first part, per prompt that differs, and how
    the two tokens compare under a third computation: the same weights in float32, the whole sequence up
    to there in one uncached forward. A near-tie there (a gap well under the bf16 engine's rounding of
    logits, ~0.06 at 10) is one the two bf16 paths' kernels rounded to different sides; a large gap
    with the plain token ahead every time would point at the speculative path."""
    differing = []
    for i, (a, b) in enumerate(zip(plain, spec, strict=True)):
        a, b = a.outputs[0].token_ids, b.outputs[0].token_ids
        k = next((j for j, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
        if k is not None:
            differing.append((i, k, a, b))
    if not differing:
        return []
    device = next(model.parameters()).device
    with torch.device("meta"):  # float32, holding the bf16 weights exactly
        reference = Transformer(model.config).eval()
    reference.to_empty(device=device)
    reference.init_buffers()  # the RoPE tables and routing state: not in the state dict
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    out = []
    for i, k, a, b in differing:
        ids = torch.tensor([prompts[i] + a[:k]], device=device)
        logits = reference(ids)[0, -1]
        top = logits.topk(2).values
        out.append(
            {
                "prompt": i,
                "token": k,
                "plain_minus_mtp_logit": round(float(logits[a[k]] - logits[b[k]]), 4),
                "top2_gap": round(float(top[0] - top[1]), 4),
                "top_logit": round(float(top[0]), 2),
            }
        )
    del reference
    return out


def step_part(args) -> None:
    """The device time of the engine's decode step alone: its step function (a CUDA graph on a GPU)
    replayed back to back, against the engine's time per output token at the same batch size, which
    adds the head, the sampler and the host's work around each step. At concurrency 1 also the
    speculative engine's fused greedy step (verify two tokens, draft the next; random weights accept
    no draft, so every step does that work): what one draft can gain is (1 + acceptance) divided by
    its time over the plain step's."""
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    runs = [(c, 0) for c in args.levels] + ([(1, 1)] if 1 in args.levels else [])
    for c, spec in runs:
        model = _model(args, mtp=bool(spec))
        vocab = model.config.vocab_size
        engine, _ = _engine(model, args, c, args.prompt_len + args.new_tokens + 1, speculative_tokens=spec)
        r = _drive(engine, _prompts(c, args.prompt_len, vocab, args.seed + c), c, params)
        runner = engine.runner
        B = next(b for b in runner.buckets if b >= c)
        kind, tokens = ("speculate", 2) if spec else ("main", 1)
        steps = [k for k in runner._steps if k[0] == kind and k[1] == B and k[3] == tokens]
        key = max(steps, key=lambda k: k[2])
        step = runner._steps[key]
        with torch.no_grad():
            for _ in range(10):
                step()
            _sync(runner.device)
            t0 = time.perf_counter()
            for _ in range(args.repeats * 20):
                step()
            _sync(runner.device)
        replay = (time.perf_counter() - t0) / (args.repeats * 20)
        if args.profile:
            prompts = _prompts(c, args.prompt_len, vocab, args.seed + c + 1)
            path = f"{args.profile}.c{c}{'.mtp' if spec else ''}"
            args.profiles.append(partial(_profile, path, step, partial(_drive, engine, prompts, c, params),
                                         n_steps=20))
        _emit(
            {
                "bench": "decode_step",
                "concurrency": c,
                "speculative": bool(spec),
                "step": {"kind": kind, "rows": key[1], "table_width": key[2], "tokens": key[3]},
                "step_ms": round(replay * 1e3, 4),
                "engine_tpot_ms": _percentiles(r["tpot"]),
            }
        )
        del engine


def _static_system(fn: Callable, prompts: list[list[int]], args, device) -> dict:
    """One static batch of every prompt: prefill time (a one-token call) and the full call."""
    ids = torch.tensor(prompts, device=device)
    fn(ids, 2)  # warm-up: compiles / captures what the system compiles per shape
    fn(ids, args.new_tokens)
    _sync(device)
    t0 = time.perf_counter()
    fn(ids, 1)
    _sync(device)
    t1 = time.perf_counter()
    out = fn(ids, args.new_tokens)
    _sync(device)
    t2 = time.perf_counter()
    prefill, total = t1 - t0, t2 - t1
    n = len(prompts)
    return {
        "tokens": out,
        "wall_s": total,
        "output_tokens_per_s": n * args.new_tokens / total,
        "ttft_ms": round(prefill * 1e3, 3),
        "tpot_ms": round((total - prefill) / (args.new_tokens - 1) * 1e3, 3),
    }


def load_part(args) -> None:
    device = torch.device(args.device)
    model = _model(args, mtp=False)
    vocab = model.config.vocab_size
    max_len = args.prompt_len + args.new_tokens + 1
    fns = {}
    if "dsv3-generate" in args.systems:
        fns["dsv3-generate"] = lambda ids, n: generate(model, ids, n, fp8_cache=args.kv_cache_dtype == "fp8")
    if "hf-static" in args.systems:
        import transformers

        with tempfile.TemporaryDirectory() as tmp:
            save_hf(model, Path(tmp) / "model", dtype=args.dtype)
            hf = transformers.DeepseekV3ForCausalLM.from_pretrained(Path(tmp) / "model", dtype=args.dtype)
            hf = hf.to(device).eval()

        def hf_static(ids: torch.Tensor, n: int) -> torch.Tensor:
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                do_sample=False,
                cache_implementation="static",
                pad_token_id=0,
                eos_token_id=None,
            )
            return out[:, ids.shape[1] :]

        fns["hf-static"] = hf_static
    engines = {}
    for name, options in ENGINES.items():
        if name in args.systems:
            engines[name], init_s = _engine(model, args, max(args.levels), max_len, **options)
            _emit({"bench": "engine_init", "system": name, "seconds": round(init_s, 3),
                   "cache_blocks": engines[name].blocks.num_blocks})  # fmt: skip
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    for c in args.levels:
        prompts = _prompts(c * args.requests_per_client, args.prompt_len, vocab, args.seed + c)
        rows, tokens = {}, {}
        # warm up on other prompts than the timed ones: no prefix hits
        warm = _prompts(c, args.prompt_len, vocab, args.seed + c + 10_000)
        for name, engine in engines.items():
            t0 = time.perf_counter()
            _drive(engine, warm, c, params)  # captures this load's shapes
            capture_s = time.perf_counter() - t0
            r = _drive(engine, prompts, c, params)
            rows[name] = {
                "output_tokens_per_s": round(r["tokens"] / r["wall_s"], 1),
                "ttft_ms": _percentiles(r["ttft"]),
                "tpot_ms": _percentiles(r["tpot"]),
                "wall_s": round(r["wall_s"], 3),
                "warmup_s": round(capture_s, 3),
            }
            tokens[name] = torch.tensor([o.outputs[0].token_ids for o in r["outputs"][:c]])
        for name, fn in fns.items():
            if name == "hf-static" and c not in args.hf_levels:
                continue
            try:
                r = _static_system(fn, prompts[:c], args, device)
            except Exception as err:  # one failing baseline (e.g. out of memory) must not hide the rest
                _emit(
                    {
                        "bench": "load",
                        "system": name,
                        "concurrency": c,
                        "error": f"{type(err).__name__}: {err}",
                    }
                )
                continue
            tokens[name] = r.pop("tokens").cpu()
            rows[name] = {
                k: round(v, 1) if k == "output_tokens_per_s" else v for k, v in r.items() if k != "wall_s"
            }
        first = next(iter(tokens), None)
        for name, row in rows.items():
            same = round((tokens[name] == tokens[first]).float().mean().item(), 4)
            _emit(
                {
                    "bench": "load",
                    "system": name,
                    "concurrency": c,
                    "requests": len(prompts) if name in engines else c,
                    "prompt_len": args.prompt_len,
                    "new_tokens": args.new_tokens,
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "preset": args.preset,
                    **row,
                    "same_tokens_as": {first: same},
                }
            )
        if "dsv3-engine" in rows and len(rows) > 1:
            base = rows["dsv3-engine"]["output_tokens_per_s"]
            _emit(
                {
                    "bench": "load_ratio",
                    "concurrency": c,
                    "engine_tokens_per_s_over": {
                        name: round(base / row["output_tokens_per_s"], 2)
                        for name, row in rows.items()
                        if name != "dsv3-engine"
                    },
                }
            )


def main() -> None:
    args = _parse()
    _emit(
        {
            "bench": "config",
            "preset": args.preset,
            "device": args.device,
            "dtype": str(args.dtype),
            "torch": torch.__version__,
            "parts": args.parts,
            "systems": args.systems,
            "engine_compile": not args.no_compile and args.device == "cuda",
        }
    )
    parts = {"prefix": prefix_part, "speculative": speculative_part, "load": load_part, "step": step_part,
             "score": score_part}
    args.profiles = []  # --profile: run after every part's timings (see the module docstring)
    for name in args.parts:
        start = time.perf_counter()
        parts[name](args)
        _emit({"bench": "part_done", "part": name, "seconds": round(time.perf_counter() - start, 1)})
    for profile in args.profiles:
        profile()


if __name__ == "__main__":
    main()
