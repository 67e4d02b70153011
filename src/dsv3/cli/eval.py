"""eval: benchmarks (MMLU, HellaSwag, ARC, GSM8K, HumanEval, MBPP) on a checkpoint, a transformers model,
or given completions (dsv3.eval)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.markup import escape

from dsv3.cli.base import command, console, err_console, progress_bar
from dsv3.config import ConfigError

ALL_TASKS = "mmlu,hellaswag,arc_easy,arc_challenge,gsm8k,humaneval,mbpp"


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 1,10") from None


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint", metavar="DIR", help="a dsv3 checkpoint, or a run's output_dir (see --which)"
    )
    source.add_argument(
        "--hf", metavar="DIR", help="any transformers causal LM directory (AutoModelForCausalLM)"
    )
    source.add_argument(
        "--predictions",
        metavar="FILE",
        help="score these completions instead of a model: jsonl of {task, id, completion} "
        "(a samples_<task>.jsonl works); generation tasks only",
    )
    source.add_argument(
        "--write-references",
        metavar="FILE",
        help="write the datasets' own solutions of the generation tasks as a predictions file",
    )
    p.add_argument("--tasks", default=ALL_TASKS, help="comma-separated task names")
    p.add_argument(
        "--output",
        default="eval_results",
        metavar="DIR",
        help="results.json, results.md and samples_<task>.jsonl go here",
    )
    p.add_argument("--limit", type=int, metavar="N", help="first N items per task (per subject for MMLU)")
    p.add_argument(
        "--num-fewshot",
        type=int,
        metavar="K",
        help="few-shot examples for every task (default: each task's own: mmlu 5, gsm8k 8, mbpp 3, others 0)",
    )
    p.add_argument("--seed", type=int, default=1234, help="few-shot draws and sampling")
    g = p.add_argument_group("generation")
    g.add_argument(
        "--samples", type=int, default=1, help="completions per generation item (pass@k needs k ≤ N)"
    )
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--pass-k", type=_ints, default=[1], metavar="K,K", help="pass@k values for code tasks")
    g.add_argument("--max-new-tokens", type=int, help="default: each task's own (gsm8k 256, code 512)")
    m = p.add_argument_group("model")
    m.add_argument("--which", choices=["best", "last"], default="best", help="for a run directory")
    m.add_argument("--tokenizer", metavar="FILE", help="tokenizer.json (default: the checkpoint's own)")
    m.add_argument("--device", help="default: cuda when available, else cpu")
    m.add_argument("--dtype", help="e.g. bfloat16, float32 (default: the checkpoint's)")
    m.add_argument("--max-length", type=int, help="context length (default: the model's max positions)")
    m.add_argument("--batch-size", type=int, default=64, help="sequences per forward pass / generation batch")
    m.add_argument("--batch-tokens", type=int, default=32768, help="tokens per log-likelihood batch")
    s = p.add_argument_group("code sandbox")
    s.add_argument("--timeout", type=float, default=10.0, help="seconds of wall clock per program")
    s.add_argument("--memory-mb", type=int, default=2048, help="address space per program")
    s.add_argument("--workers", type=int, help="programs run at once (default: one per CPU)")
    s.add_argument(
        "--isolate",
        choices=["auto", "required", "off"],
        default="auto",
        help="namespaces (no network, read-only filesystem, PID namespace) where Linux allows",
    )
    p.add_argument(
        "--cache-dir", metavar="DIR", help="dataset cache (default: $DSV3_EVAL_CACHE or ~/.cache/dsv3/eval)"
    )


class _Bars:
    """One rich progress display, a bar per (task, stage)."""

    def __init__(self) -> None:
        self.progress = progress_bar("{task.description}")

    def __call__(self, what: str, total: int):
        task = self.progress.add_task(escape(what), total=total)
        return lambda n: self.progress.advance(task, n)


def _load_model(args: argparse.Namespace):
    from dsv3.eval.backends import load_checkpoint, load_transformers

    batching = dict(batch_size=args.batch_size, batch_tokens=args.batch_tokens)
    if args.checkpoint:
        return load_checkpoint(
            args.checkpoint,
            args.which,
            tokenizer=args.tokenizer,
            device=args.device,
            dtype=args.dtype,
            max_length=args.max_length,
            **batching,
        )
    return load_transformers(
        args.hf, device=args.device, dtype=args.dtype, max_length=args.max_length, **batching
    )


@command(
    "eval",
    order=60,
    arguments=_eval_arguments,
    summary="benchmarks (MMLU, HellaSwag, ARC, GSM8K, HumanEval, MBPP) on a checkpoint, offline",
    example="dsv3 eval --checkpoint runs/demo --tasks arc_easy,humaneval --limit 20",
)
def run_eval(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from dsv3.eval.runner import EvalConfig, evaluate, markdown_table, read_predictions, write_references
    from dsv3.eval.sandbox import SandboxLimits

    cache_dir = Path(args.cache_dir) if args.cache_dir else None
    if args.write_references:
        n = write_references(args.tasks.split(","), args.write_references, cache_dir, args.limit)
        console.print(f"wrote {n} reference completions to {escape(args.write_references)}")
        return 0
    try:
        config = EvalConfig(
            tasks=args.tasks.split(","),
            limit=args.limit,
            num_fewshot=args.num_fewshot,
            seed=args.seed,
            samples=args.samples,
            temperature=args.temperature,
            top_p=args.top_p,
            pass_k=args.pass_k,
            max_new_tokens=args.max_new_tokens,
            cache_dir=cache_dir,
            workers=args.workers,
            sandbox=SandboxLimits(
                timeout_s=args.timeout,
                cpu_s=max(1, round(args.timeout)),
                memory_mb=args.memory_mb,
                isolate=args.isolate,
            ),
        )
    except ValidationError as e:
        first = e.errors()[0]
        raise ConfigError(f"--{'-'.join(str(x) for x in first['loc'])}: {first['msg']}") from None
    predictions = read_predictions(args.predictions) if args.predictions else None
    lm = None if predictions is not None else _load_model(args)
    bars = _Bars()
    with bars.progress:
        results = evaluate(
            lm,
            config,
            args.output,
            predictions=predictions,
            predictions_source=args.predictions or "",
            progress=bars,
        )
    console.print(markdown_table(results), highlight=False, markup=False)
    err_console.print(
        f"results: {escape(str(Path(args.output) / 'results.json'))}, samples_<task>.jsonl beside it"
    )
    return 0
