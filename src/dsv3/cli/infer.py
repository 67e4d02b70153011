"""generate and serve: a checkpoint through the serving engine (dsv3.infer), offline or over HTTP."""

from __future__ import annotations

import argparse
import gc

from rich.markup import escape

from dsv3.cli.base import command, console, progress_bar
from dsv3.config import ConfigError


def _checkpoint_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a checkpoint directory, or a run's output_dir (see --which)")
    p.add_argument("--which", choices=["best", "last"], default="best",
                   help="for a run directory: the checkpoint with the best validation loss, or the last")
    p.add_argument("--tokenizer", metavar="FILE", help="tokenizer.json (default: the checkpoint's own)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when present)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                   help="weights and cache (default: bfloat16 on a GPU, the checkpoint's on a CPU)")


def _engine_flags(p: argparse.ArgumentParser, max_num_seqs: int) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--max-num-seqs", type=int, default=max_num_seqs, help="sequences batched at once")
    g.add_argument("--max-model-len", type=int, help="prompt + output tokens (default: the model's context)")
    g.add_argument("--max-num-batched-tokens", type=int, default=8192,
                   help="size of a step's prefill forward (rows x longest chunk)")
    g.add_argument("--max-prefill-chunk", type=int, default=2048,
                   help="prompt tokens one sequence feeds a step")
    g.add_argument("--num-blocks", type=int, help="cache blocks of 64 tokens (default: from memory)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                   help="fp8: e4m3 latent with one scale per token and layer (half of bf16)")
    g.add_argument("--no-prefix-caching", action="store_true", help="do not share cached prompt prefixes")
    g.add_argument("--speculative-tokens", type=int, default=0, choices=[0, 1],
                   help="MTP speculative decoding: tokens drafted per step by the model's MTP module")
    g.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly on a GPU")
    g.add_argument("--no-compile", action="store_true",
                   help="capture the step functions without torch.compile (no compile time, slower steps)")
    g.add_argument("--no-async-scheduling", action="store_true",
                   help="read every step back before scheduling the next (no overlap of host and GPU)")


def _engine_config(args: argparse.Namespace):
    from pydantic import ValidationError

    from dsv3.infer.engine import EngineConfig

    try:
        return EngineConfig(
            max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
            max_num_batched_tokens=args.max_num_batched_tokens, max_prefill_chunk=args.max_prefill_chunk,
            num_blocks=args.num_blocks, gpu_memory_utilization=args.gpu_memory_utilization,
            kv_cache_dtype=args.kv_cache_dtype, enable_prefix_caching=not args.no_prefix_caching,
            speculative_tokens=args.speculative_tokens, cuda_graphs=False if args.no_cuda_graphs else None,
            compile=False if args.no_compile else None,
            async_scheduling=False if args.no_async_scheduling else None,
        )
    except ValidationError as e:
        first = e.errors()[0]
        flag = "--" + str(first["loc"][0]).replace("_", "-")
        raise ConfigError(f"{flag}: {first['msg']}") from None


def _llm(args: argparse.Namespace):
    from dsv3.infer.llm import LLM

    try:
        return LLM(args.checkpoint, which=args.which, tokenizer=args.tokenizer, device=args.device,
                   dtype=args.dtype, config=_engine_config(args))
    except ValueError as e:
        raise ConfigError(str(e)) from None


# --- generate --------------------------------------------------------------------------------------


def _generate_arguments(p: argparse.ArgumentParser) -> None:
    p.description += """

--prompt continues one text and prints it; --input reads a JSONL file of prompts
({"prompt": ...} or {"messages": [...]}, plus optional "id" and sampling fields that
override the flags below for that line) and writes one JSON line per prompt to --output,
all in one continuous batch. Both run through the serving engine."""
    _checkpoint_flags(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="text to continue")
    what.add_argument("--input", metavar="JSONL", help="prompts, one JSON object a line")
    p.add_argument("--output", metavar="JSONL", help="where --input's results go")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (per prompt, for --input)")
    _engine_flags(p, max_num_seqs=64)


@command(
    "generate", order=50, arguments=_generate_arguments,
    summary="continue prompts with a trained checkpoint: one --prompt, or a JSONL file of them",
    example='dsv3 generate --checkpoint runs/demo --prompt "def parse_args(" --max-new-tokens 80',
)
def run_generate(args: argparse.Namespace) -> int:
    if args.prompt is not None:
        if args.output:
            raise ConfigError("--output goes with --input (a --prompt's text is printed)")
        from dsv3.infer.text import generate_from_checkpoint

        text = generate_from_checkpoint(
            args.checkpoint, args.prompt, which=args.which, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_p=args.top_p, seed=args.seed, tokenizer=args.tokenizer,
            device=args.device, dtype=args.dtype,
            config=_engine_config(args).model_copy(update={"max_num_seqs": 1}),
        )
        console.print(f"[bold]{escape(args.prompt)}[/bold]{escape(text)}", highlight=False)
        return 0
    if not args.output:
        raise ConfigError("--input needs --output (a JSONL file to write)")
    from dsv3.infer.batch import encode_prompt_lines, read_prompt_file, run_prompt_lines

    defaults = {"max_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "seed": args.seed}
    lines = read_prompt_file(args.input, defaults)  # a bad file fails before the model loads
    llm = _llm(args)
    encode_prompt_lines(llm, lines, args.input)
    with progress_bar("generating") as progress:
        task = progress.add_task("prompts", total=len(lines))
        summary = run_prompt_lines(
            llm, lines, args.output, on_progress=lambda done, total: progress.update(task, completed=done),
        )
    console.print(
        f"wrote [bold]{escape(args.output)}[/bold]: {summary.prompts:,} prompts, {summary.prompt_tokens:,} "
        f"prompt and {summary.generated_tokens:,} generated tokens in {summary.seconds:.1f} s "
        f"({summary.generated_tokens / max(summary.seconds, 1e-9):,.0f} tokens/s)", highlight=False,
    )
    return 0


# --- serve -----------------------------------------------------------------------------------------


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    p.description += """

An OpenAI-compatible server: POST /v1/completions and /v1/chat/completions (streaming
with "stream": true), GET /v1/models, /health and /metrics (Prometheus). SIGTERM stops
taking requests and finishes the ones in flight. See docs/serving.md."""
    _checkpoint_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name",
                   help="the model name clients send (default: the checkpoint's folder)")
    p.add_argument("--max-waiting", type=int, default=512,
                   help="requests that may wait for a place in the batch; more get 429")
    _engine_flags(p, max_num_seqs=256)


@command(
    "serve", order=55, arguments=_serve_arguments,
    summary="serve a checkpoint over an OpenAI-compatible HTTP API (continuous batching, streaming)",
    example="dsv3 serve --checkpoint runs/demo --port 8000 --max-num-seqs 64",
)
def run_serve(args: argparse.Namespace) -> int:
    try:
        from dsv3.infer.server import AsyncEngine, build_app, serve
    except ImportError as e:
        hint = "pip install fastapi uvicorn prometheus-client"
        raise ConfigError(f"dsv3 serve needs {e.name}: {hint}") from None
    if args.max_waiting < 1:
        raise ConfigError(f"--max-waiting {args.max_waiting}: must be positive")
    llm = _llm(args)
    name = args.served_model_name or llm.directory.name
    engine = AsyncEngine(llm.engine, max_waiting=args.max_waiting)
    app = build_app(engine, name, llm.engine.tokenizer)
    # What start-up made (the model, the compiled code) lives as long as the server: keep it out of
    # the cyclic collector's full passes, which otherwise walk it while requests wait (vLLM does too).
    gc.collect()
    gc.freeze()
    console.print(f"serving [bold]{escape(name)}[/bold] ({llm.directory}) on http://{args.host}:{args.port}/v1",
                  highlight=False)
    serve(app, args.host, args.port)
    return 0
