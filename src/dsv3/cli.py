"""`dsv3 <command>`: each command parses its flags, calls one library function, and prints.

Commands are registered in `COMMANDS`; each has an `add_<name>` that declares its flags (with
an example in its help) and a `run_<name>` that does the work. Library code logs; only this
module prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dsv3 import __version__
from dsv3.config import ConfigError

console = Console()
err_console = Console(stderr=True)


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def _command(
    sub: argparse._SubParsersAction, name: str, summary: str, example: str
) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=summary,
        description=f"{summary}\n\nexample:\n  {example}",
        formatter_class=_Formatter,
    )


# Each entry: (name, summary, example, add_arguments, run). Filled below by the command blocks.
AddArguments = Callable[[argparse.ArgumentParser], None]
RunCommand = Callable[[argparse.Namespace], int]
COMMANDS: list[tuple[str, str, str, AddArguments, RunCommand]] = []


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsv3",
        description="Build DeepSeek-V3-style models end to end: data, scaling, training, inference.",
        epilog="example:\n  dsv3 plan --config small\n\nEach command has its own --help.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"dsv3 {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, summary, example, add_arguments, run in COMMANDS:
        p = _command(sub, name, summary, example)
        add_arguments(p)
        p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except ConfigError as e:
        err_console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130


# --------------------------------------------------------------------------------------------
# plan, select-config, validate-chinchilla: the scaling tools (dsv3.scaling)
# --------------------------------------------------------------------------------------------


def _add_config_flags(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--config", action="append", metavar="X", help=f"preset name or YAML path; {what}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the configs, e.g. train.seq_len=8192; repeatable, last wins")


def _ratio_bounds(args: argparse.Namespace) -> tuple[float, float]:
    if not 0 < args.ratio_min <= args.ratio_max:
        got = f"--ratio-min {args.ratio_min:g}, --ratio-max {args.ratio_max:g}"
        raise ConfigError(f"{got}: need 0 < min <= max")
    return args.ratio_min, args.ratio_max


def _print_sections(sections: list, names: list[str]) -> None:
    for title, rows in sections:
        table = Table(title=title, title_justify="left", show_edge=False)
        table.add_column("")
        for name in names:
            table.add_column(name, justify="right")
        for label, cells in rows:
            table.add_row(label, *cells)
        console.print(table)
        console.print()


def add_plan(p: argparse.ArgumentParser) -> None:
    _add_config_flags(p, "repeatable")
    p.add_argument("--all", action="store_true", help="every preset in configs/, smallest first")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help='one JSON object: the plan, or {"plans": [...]}')
    out.add_argument("--markdown", action="store_true", help="the docs/scaling.md page (make docs)")
    p.add_argument("--ratio-min", type=float, default=20.0, help="Chinchilla tokens per active param, low")
    p.add_argument("--ratio-max", type=float, default=26.0, help="Chinchilla tokens per active param, high")
    p.add_argument("--no-causal", action="store_true", help="attention FLOPs without the causal halving")


def run_plan(args: argparse.Namespace) -> int:
    from dsv3.config import load_run_config, preset_names
    from dsv3.scaling import markdown_report, plan_run, plan_sections

    if not args.config and not args.all:
        raise ConfigError("plan: give --config X (a preset name or a YAML path) or --all")
    ratio_min, ratio_max = _ratio_bounds(args)
    refs = list(dict.fromkeys((args.config or []) + (preset_names() if args.all else [])))
    runs = [load_run_config(ref, args.set) for ref in refs]
    plans = [plan_run(run, ratio_min, ratio_max, causal=not args.no_causal) for run in runs]
    if args.all:
        plans.sort(key=lambda plan: plan.params.total)
    if args.json:
        obj = plans[0].as_dict() if len(plans) == 1 else {"plans": [plan.as_dict() for plan in plans]}
        sys.stdout.write(json.dumps(obj) + "\n")
    elif args.markdown:
        sys.stdout.write(markdown_report(plans))
    else:
        _print_sections(plan_sections(plans), [plan.name for plan in plans])
    return 0


COMMANDS.append((
    "plan",
    "exact parameter counts, training FLOPs, KV cache, memory per GPU and Chinchilla budget of a config",
    "dsv3 plan --config small --set train.micro_batch_size=4 --json",
    add_plan,
    run_plan,
))


def add_select_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    p.add_argument("--gpu-memory", type=float, required=True, metavar="GB", help="memory per GPU, GiB")
    p.add_argument("--hours", type=float, help="wall-clock budget; configs that need longer do not fit")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for the time")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100 SXM: 989)")
    p.add_argument("--ratio", type=float, default=20.0, help="Chinchilla tokens per active parameter")
    p.add_argument("--json", action="store_true", help="one JSON object with every config's verdict")
    _add_config_flags(p, "repeatable, judged besides the presets")


def run_select_config(args: argparse.Namespace) -> int:
    from dsv3.config import load_run_config, preset_names
    from dsv3.scaling import describe_layout, human_bytes, human_count, select_configs

    bad = {"--gpus": args.gpus < 1, "--gpu-memory": args.gpu_memory <= 0, "--mfu": not 0 < args.mfu <= 1,
           "--peak-tflops": args.peak_tflops <= 0, "--ratio": args.ratio <= 0,
           "--hours": args.hours is not None and args.hours <= 0}
    if any(bad.values()):
        flags = ", ".join(flag for flag, wrong in bad.items() if wrong)
        raise ConfigError(f"select-config: {flags} out of range (gpus >= 1, 0 < mfu <= 1, others > 0)")
    extra = args.config or []  # these get the --set overrides, and replace a preset of the same name
    runs = [load_run_config(ref) for ref in preset_names() if ref not in extra]
    runs += [load_run_config(ref, args.set) for ref in extra]
    choices = select_configs(runs, args.gpus, args.gpu_memory, hours=args.hours, mfu=args.mfu,
                             peak_tflops=args.peak_tflops, ratio=args.ratio)
    if args.json:
        sys.stdout.write(json.dumps({"gpus": args.gpus, "gpu_memory_gb": args.gpu_memory, "hours": args.hours,
                                     "mfu": args.mfu, "choices": [c.as_dict() for c in choices]}) + "\n")
        return 0 if any(c.fits for c in choices) else 1
    budget = f"{args.gpus} x {args.gpu_memory:g} GB" + (f", {args.hours:g} h" if args.hours else "")
    table = Table(title=f"Fits {budget} at {args.mfu:.0%} MFU", title_justify="left", show_edge=False)
    for col in ("#", "config", "total", "active", "layout", "mbs", "memory/GPU", "tokens", "hours"):
        table.add_column(col, justify="left" if col in ("config", "layout") else "right")
    fitting = [c for c in choices if c.fits]
    for rank, c in enumerate(fitting, 1):
        layout = describe_layout(c.parallel, gpus=False) + ", recompute" * c.recompute
        table.add_row(str(rank), c.name, human_count(c.total_params), human_count(c.active_params), layout,
                      str(c.micro_batch_size), human_bytes(c.memory.total), human_count(c.tokens),
                      f"{c.hours:,.1f}")
    console.print(table if fitting else "[red]No config fits this budget.[/red]")
    for c in choices:
        if not c.fits:
            line = f"  [yellow]{c.name}[/yellow] does not fit: {c.reason}"
            console.print(line, highlight=False, soft_wrap=True)
    if fitting:
        best = fitting[0].name
        console.print(f"Choose [bold]{best}[/bold]: the largest model that trains compute-optimally here.")
    return 0 if fitting else 1


COMMANDS.append((
    "select-config",
    "rank the presets (and --config files) that train compute-optimally on a GPU budget; why others do not",
    "dsv3 select-config --gpus 8 --gpu-memory 80 --hours 48",
    add_select_config,
    run_select_config,
))


def add_validate_chinchilla(p: argparse.ArgumentParser) -> None:
    _add_config_flags(p, "repeatable; default: every preset")
    p.add_argument("--ratio-min", type=float, default=20.0, help="fewest tokens per active parameter")
    p.add_argument("--ratio-max", type=float, default=26.0, help="most tokens per active parameter")
    p.add_argument("--strict", action="store_true", help="exit 1 when any config is outside the range")


def run_validate_chinchilla(args: argparse.Namespace) -> int:
    from dsv3.config import load_run_config, preset_names
    from dsv3.scaling import chinchilla_check, human_count

    ratio_min, ratio_max = _ratio_bounds(args)
    table = Table(title=f"Chinchilla: {ratio_min:g}-{ratio_max:g} tokens per active parameter",
                  title_justify="left", show_edge=False)
    for col in ("config", "active", "planned tokens", f"needs ({ratio_min:g}x)", "tokens/param"):
        table.add_column(col, justify="left" if col == "config" else "right")
    table.add_column("verdict", no_wrap=True, min_width=13)
    failed = []
    for ref in args.config or preset_names():
        run = load_run_config(ref, args.set)
        check = chinchilla_check(run.model, run.train, ratio_min, ratio_max)
        if not check.compliant:
            failed.append(ref)
        colour = "green" if check.compliant else "red"
        table.add_row(run.name, human_count(check.active_params), human_count(check.tokens),
                      human_count(check.required_tokens), f"{check.tokens_per_param:.1f}",
                      f"[{colour}]{check.verdict}[/{colour}]")
    console.print(table)
    if failed:
        colour = "red" if args.strict else "yellow"
        console.print(f"[{colour}]not compliant: {', '.join(failed)}[/]", soft_wrap=True)
    return 1 if failed and args.strict else 0


COMMANDS.append((
    "validate-chinchilla",
    "check that each config plans 20-26 training tokens per active parameter (steps x batch x seq_len)",
    "dsv3 validate-chinchilla --config 1b --config configs/5b.yaml --strict",
    add_validate_chinchilla,
    run_validate_chinchilla,
))


# --------------------------------------------------------------------------------------------
# tokenizer, corpus: tokenizer training and the local standard-library corpus (dsv3.data)
# --------------------------------------------------------------------------------------------


def _reading_progress(what: str, total: int | None):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err_console, transient=True)


def add_tokenizer(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="<action>", required=True)
    train = sub.add_parser("train", help="train a byte-level BPE on the text of jsonl/parquet documents",
                           formatter_class=_Formatter)
    train.add_argument("--input", nargs="+", required=True, metavar="PATH",
                       help=".jsonl, .jsonl.gz, .jsonl.zst or .parquet files, or folders of them")
    train.add_argument("--vocab-size", type=int, required=True, help="tokens, special tokens included")
    train.add_argument("--output", required=True, metavar="DIR", help="gets tokenizer.json and its configs")
    train.add_argument("--text-field", default="text", help="the field (column) holding the text")
    train.add_argument("--limit", type=int, metavar="N", help="train on the first N documents only")


def run_tokenizer(args: argparse.Namespace) -> int:
    from dsv3.data.tokenizer import load_tokenizer, special_token_ids, train_tokenizer_from_files

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit {args.limit}: must be positive")
    with _reading_progress("reading documents", args.limit) as progress:
        task = progress.add_task("read", total=args.limit)
        path, used, skipped, examples = train_tokenizer_from_files(
            args.input, args.vocab_size, args.output, args.text_field, args.limit,
            on_document=lambda: progress.advance(task),
        )
    tokenizer = load_tokenizer(path)
    bos, eos, pad = special_token_ids(tokenizer)
    console.print(f"wrote [bold]{path}[/bold]: {tokenizer.get_vocab_size():,} tokens from {used:,} documents "
                  f"(bos={bos}, eos={eos}, pad={pad})", highlight=False)
    if skipped:
        console.print(f"[yellow]skipped {skipped:,} unreadable records[/yellow], e.g.:", highlight=False)
        for record in examples[:5]:
            console.print(f"  {record}", highlight=False, soft_wrap=True)
    return 0


COMMANDS.append((
    "tokenizer",
    "train a byte-level BPE tokenizer (DeepSeek-V3 special tokens) that transformers loads",
    "dsv3 tokenizer train --input out/clean --vocab-size 32000 --output out/tokenizer",
    add_tokenizer,
    run_tokenizer,
))


def add_corpus(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="source", metavar="<source>", required=True)
    stdlib = sub.add_parser("stdlib", formatter_class=_Formatter,
                            help="this Python's standard library: its code and docs cut into documents")
    stdlib.add_argument("--output", required=True, metavar="FILE.jsonl.zst", help="where the documents go")
    stdlib.add_argument("--kind", choices=["code", "prose", "all"], default="all", help="which documents")
    stdlib.add_argument("--limit", type=int, metavar="N", help="stop after N documents")
    stdlib.add_argument("--max-lines", type=int, default=20, help="longer definitions/docstrings are cut")


def run_corpus(args: argparse.Namespace) -> int:
    from dsv3.data.corpus import iter_stdlib_documents, stdlib_root, write_jsonl_zst

    for flag, value in (("--limit", args.limit), ("--max-lines", args.max_lines)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} {value}: must be positive")
    with _reading_progress("cutting the standard library", args.limit) as progress:
        task = progress.add_task("docs", total=args.limit)
        docs = iter_stdlib_documents(args.kind, args.limit, max_lines=args.max_lines)
        count = write_jsonl_zst((progress.advance(task) or doc for doc in docs), args.output)
    console.print(f"wrote {count:,} {args.kind} documents from {stdlib_root()} to [bold]{args.output}[/bold]",
                  highlight=False)
    return 0


COMMANDS.append((
    "corpus",
    "write a real local corpus (the Python standard library's code and docs) as jsonl.zst documents",
    "dsv3 corpus stdlib --output data/stdlib.jsonl.zst --kind all",
    add_corpus,
    run_corpus,
))


# --------------------------------------------------------------------------------------------
# convert: Hugging Face DeepSeek-V3 checkpoints in and out (dsv3.model.hf)
# --------------------------------------------------------------------------------------------


def add_convert(p: argparse.ArgumentParser) -> None:
    p.description += """

dsv3 checkpoints already are Hugging Face DeepSeek-V3 directories, so both directions
rewrite one, tensor by tensor (never the whole model in memory): each tensor checked
against config.json, FP8 blocks dequantized, cast to --dtype, resharded at
--max-shard-size, config.json in canonical form, tokenizer/generation files copied.
  --from-hf  a published or third-party checkpoint (FP8 or not, rope_scaling or
             rope_parameters) -> a directory dsv3 trains and serves from
  --to-hf    a training checkpoint (a step_* dir, or a run's output_dir: its newest
             complete one) -> a clean directory for transformers/vLLM, no trainer state"""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="SRC", help="a Hugging Face checkpoint directory")
    src.add_argument("--to-hf", metavar="SRC", help="a dsv3 checkpoint (step_* dir) or a run output_dir")
    p.add_argument("--to", required=True, metavar="DST", help="the directory to write (must not exist)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="weight dtype; auto = the config's (FP8 checkpoints: their declared dtype)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists (atomically)")


def run_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from dsv3.model.hf import convert_hf

    src = Path(args.from_hf or args.to_hf)
    if args.to_hf and not (src / "config.json").is_file():
        from dsv3.train.checkpoint import list_checkpoints

        found = list_checkpoints(src)
        if not found:
            raise ConfigError(f"--to-hf {src}: no config.json and no complete step_* checkpoint in it")
        src = found[-1]
    with Progress(TextColumn("converting"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True) as progress:
        task = progress.add_task("tensors", total=None)
        cfg, n = convert_hf(src, args.to, dtype=args.dtype, max_shard_size=args.max_shard_size,
                            overwrite=args.overwrite, on_tensor=lambda _: progress.advance(task))
    console.print(f"wrote [bold]{args.to}[/bold]: {n:,} tensors from {src} "
                  f"({cfg.num_hidden_layers} layers, {cfg.num_nextn_predict_layers} MTP)", highlight=False)
    return 0


COMMANDS.append((
    "convert",
    "rewrite a Hugging Face DeepSeek-V3 checkpoint: import (FP8 dequantized) or export a training checkpoint",
    "dsv3 convert --from-hf ~/models/DeepSeek-V3 --to models/dsv3-bf16 --dtype bfloat16",
    add_convert,
    run_convert,
))


# --------------------------------------------------------------------------------------------
# train, generate: the trainer (dsv3.train) and sampling from its checkpoints
# --------------------------------------------------------------------------------------------


def add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, metavar="X", help="run config: YAML path or preset name")
    p.add_argument("--resume", metavar="DIR|auto",
                   help="a checkpoint directory to continue from, or the newest complete one in output_dir")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key, e.g. train.steps=200; repeatable, last wins")


def _print_train_record(r: dict, total_steps: int) -> None:
    from dsv3.train.metrics import format_eval, format_progress

    kind = r["kind"]
    if kind == "run":
        resumed = f", resumed from {r['resumed_from']}" if r["resumed_from"] else ""
        console.print(
            f"[bold]{r['name']}[/bold] on {r['device']}{resumed}: {r['params'] / 1e6:.2f}M parameters "
            f"({r['active_params'] / 1e6:.2f}M active), {r['tokens_per_step']:,} tokens/step, "
            f"{r['train_windows']:,} train / {r['valid_windows']:,} valid windows, "
            f"KV cache {r['kv_cache_bytes_per_token']:,} B/token (MHA would need "
            f"{r['kv_cache_bytes_per_token_mha']:,})",
            highlight=False,
            soft_wrap=True,
        )
    elif kind == "train":
        console.print(format_progress(r, total_steps), highlight=False, soft_wrap=True)
    elif kind == "eval":
        console.print(format_eval(r), highlight=False, soft_wrap=True)
        if r.get("sample"):
            console.print(f"  sample: {r['sample']!r}", highlight=False, markup=False, soft_wrap=True)
    elif kind == "skip":
        console.print(f"[yellow]step {r['step']}: non-finite loss or gradient, step skipped[/yellow]")


def run_train(args: argparse.Namespace) -> int:
    from dsv3.config import load_run_config
    from dsv3.train.trainer import TrainingDiverged, train

    cfg = load_run_config(args.config, args.set)
    try:
        result = train(cfg, resume=args.resume, on_record=lambda r: _print_train_record(r, cfg.train.steps))
    except TrainingDiverged as e:
        err_console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 1
    table = Table(title=f"{cfg.name}: step {result.step}", title_justify="left", show_edge=False,
                  show_header=False)
    table.add_column("")
    table.add_column("")
    if result.val_loss is not None:
        table.add_row("validation loss / perplexity", f"{result.val_loss:.4f} / {result.val_ppl:.1f}")
    table.add_row("unigram baseline loss / perplexity",
                  f"{result.unigram_loss:.4f} / {result.unigram_ppl:.1f}")
    table.add_row("last checkpoint", str(result.last_checkpoint))
    table.add_row("best checkpoint (validation)", str(result.best_checkpoint))
    for plot in result.plots:
        table.add_row("plot", str(plot))
    table.add_row("metrics", str(result.output_dir / "metrics.jsonl"))
    table.add_row("tensorboard", f"tensorboard --logdir {result.output_dir}")
    mem = result.peak_memory_gb
    gpu = f", GPU {mem['peak_gpu_mem_gb']:.2f} GB" if "peak_gpu_mem_gb" in mem else ""
    table.add_row("peak memory", f"RSS {mem['peak_rss_gb']:.2f} GB{gpu}")
    table.add_row("KV cache per token (bf16)", f"{result.kv_cache_bytes_per_token:,} bytes")
    table.add_row("wall time", f"{result.wall_s:.0f} s")
    console.print(table)
    return 0


COMMANDS.append((
    "train",
    "train a model on token shards: checkpoints, resume, evaluation, metrics and plots in train.output_dir",
    "dsv3 train --config configs/train/demo.yaml --resume auto --set train.steps=400",
    add_train,
    run_train,
))


def add_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a checkpoint directory, or a run's output_dir (its best, else newest, checkpoint)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", metavar="FILE", help="tokenizer.json (default: the checkpoint's own)")


def run_generate(args: argparse.Namespace) -> int:
    from dsv3.train.sample import generate_from_checkpoint

    text = generate_from_checkpoint(
        args.checkpoint, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_p=args.top_p, seed=args.seed, tokenizer=args.tokenizer,
    )
    console.print(f"[bold]{escape(args.prompt)}[/bold]{escape(text)}", highlight=False)
    return 0


COMMANDS.append((
    "generate",
    "continue a prompt with a trained checkpoint, its tokenizer and the latent-cache decoder",
    'dsv3 generate --checkpoint runs/demo --prompt "def parse_args(" --max-new-tokens 80',
    add_generate,
    run_generate,
))


# --------------------------------------------------------------------------------------------
# preprocess: raw documents to clean, deduplicated documents and token shards (dsv3.data.pipeline)
# --------------------------------------------------------------------------------------------


def add_preprocess(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, metavar="FILE", help="the pipeline YAML")
    p.add_argument("--input", nargs="+", metavar="PATH",
                   help="replace the YAML's inputs (files, globs, folders) with its first input's settings")
    p.add_argument("--output", metavar="DIR", help="replace the YAML's output folder")
    p.add_argument("--workers", type=int, metavar="N", help="processes working on parts in parallel")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key, e.g. dedup.minhash.threshold=0.7; repeatable, last wins")


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f}"


def _print_preprocess_report(r: dict) -> None:
    table = Table(title=f"{r['name']}: {r['output']} ({r['parts']} parts, {r['workers']} workers)",
                  title_justify="left", show_edge=False)
    table.add_column("step", no_wrap=True)
    for col in ("docs in", "docs out", "MB in", "MB out", "changed"):
        table.add_column(col, justify="right", no_wrap=True)
    for s in r["steps"]:
        table.add_row(s["name"], f"{s['docs_in']:,}", f"{s['docs_out']:,}", _mb(s["bytes_in"]),
                      _mb(s["bytes_out"]), f"{s['modified']:,}")
    console.print(table)
    console.print("removed, by reason (all of them in report.json):")
    for s in r["steps"]:
        if s["removed"]:
            reasons = ", ".join(f"{k} {v:,}" for k, v in list(s["removed"].items())[:6])
            more = f" and {len(s['removed']) - 6} more" if len(s["removed"]) > 6 else ""
            console.print(f"  {s['name']}: {reasons}{more}", highlight=False, soft_wrap=True)
    docs = r["documents"]
    console.print(f"kept {docs['count']:,} documents ({_mb(docs['bytes'])} MB) in {docs['folder']}",
                  highlight=False)
    if "dedup" in r:
        d = r["dedup"]
        sizes = ", ".join(f"{size}x{count:,}" for size, count in d["cluster_sizes"].items()) or "none"
        console.print(f"dedup: {d['duplicate_clusters']:,} clusters (size x count: {sizes}), removed "
                      f"{d['exact_removed']:,} exact + {d['near_removed']:,} near duplicates of "
                      f"{d['documents']:,}; {d['candidate_pairs']:,} LSH candidate pairs", highlight=False,
                      soft_wrap=True)
    if "shards" in r:
        t, sh = r["tokenizer"], r["shards"]
        how = f"trained on {t['documents']:,} documents" if t["trained"] else "given"
        console.print(f"tokenizer: {t['path']} ({t['vocab_size']:,} tokens, {how})", highlight=False)
        split = ", ".join(f"{name} {sh[name]['documents']:,} docs / {sh[name]['tokens']:,} tokens"
                          for name in ("train", "valid"))
        console.print(f"shards: {sh['folder']}: {split} ({sh['dtype']}, EOS {sh['eos_id']} appended)",
                      highlight=False)
    def speed_of(t: dict) -> str:
        if "docs_per_s" in t:
            return f" ({t['docs_per_s']:,.0f} docs/s, {t['mb_per_s']:.2f} MB/s)"
        return " (done before)" if t.get("parts") == 0 else ""

    speed = "; ".join(f"{stage} {t['seconds']:.1f} s{speed_of(t)}" for stage, t in r["throughput"].items())
    console.print(f"throughput: {speed}; wall {r['wall_seconds']:.1f} s"
                  + (" (resumed)" if r["resumed"] else ""), highlight=False, soft_wrap=True)
    console.print(f"report: {r['output']}/report.json; removed documents: {r['output']}/rejects/",
                  highlight=False)


def run_preprocess(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from dsv3.data.pipeline import run_pipeline
    from dsv3.data.pipeline_config import load_pipeline_config

    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: must be at least 1")
    cfg = load_pipeline_config(args.config, args.set, args.input, args.output, args.workers)
    columns = (TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[docs]:>10,} docs"), TimeElapsedColumn())
    with Progress(*columns, console=err_console) as progress:
        tasks: dict[str, int] = {}

        def on_progress(stage: str, done: int, total: int, docs: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total, docs=0)
            progress.update(tasks[stage], completed=done, total=total, docs=docs)

        report = run_pipeline(cfg, on_progress)
    _print_preprocess_report(report)
    return 0


COMMANDS.append((
    "preprocess",
    "clean, filter, deduplicate and tokenize documents into training shards, as one YAML pipeline says",
    "dsv3 preprocess --config configs/data/demo.yaml --workers 2 --set dedup.minhash.threshold=0.7",
    add_preprocess,
    run_preprocess,
))


if __name__ == "__main__":
    sys.exit(main())
