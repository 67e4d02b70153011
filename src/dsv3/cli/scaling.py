"""plan, select-config, validate-chinchilla: the scaling tools (dsv3.scaling)."""

from __future__ import annotations

import argparse
import json
import sys

from rich.table import Table

from dsv3.cli.base import add_config_flags, command, console
from dsv3.config import ConfigError, load_run_config, preset_names
from dsv3.scaling import (
    CHINCHILLA_MAX,
    CHINCHILLA_MIN,
    DEFAULT_PEAK_TFLOPS,
    chinchilla_check,
    describe_layout,
    human_bytes,
    human_count,
    markdown_report,
    plan_run,
    plan_sections,
    select_configs,
)


def _add_ratio_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ratio-min", type=float, default=CHINCHILLA_MIN,
                   help="fewest tokens per active parameter")
    p.add_argument("--ratio-max", type=float, default=CHINCHILLA_MAX, help="most tokens per active parameter")


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


def _plan_arguments(p: argparse.ArgumentParser) -> None:
    add_config_flags(p, "repeatable")
    p.add_argument("--all", action="store_true", help="every preset in configs/, smallest first")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help='one JSON object: the plan, or {"plans": [...]}')
    out.add_argument("--markdown", action="store_true", help="the docs/scaling.md page (make docs)")
    _add_ratio_flags(p)
    p.add_argument("--no-causal", action="store_true", help="attention FLOPs without the causal halving")


@command(
    "plan", order=80, arguments=_plan_arguments,
    summary=(
        "exact parameter counts, training FLOPs, KV cache, memory per GPU and Chinchilla budget of a "
        "config"
    ),
    example="dsv3 plan --config small --set train.micro_batch_size=4 --json",
)
def run_plan(args: argparse.Namespace) -> int:
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


def _select_config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    p.add_argument("--gpu-memory", type=float, required=True, metavar="GB", help="memory per GPU, GiB")
    p.add_argument("--hours", type=float, help="wall-clock budget; configs that need longer do not fit")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for the time")
    p.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS,
                   help="dense bf16 peak per GPU (H100/H200 SXM: 989; see dsv3.scaling.PEAK_BF16_TFLOPS)")
    p.add_argument("--ratio", type=float, default=CHINCHILLA_MIN,
                   help="Chinchilla tokens per active parameter")
    p.add_argument("--json", action="store_true", help="one JSON object with every config's verdict")
    add_config_flags(p, "repeatable, judged besides the presets")


@command(
    "select-config", order=81, arguments=_select_config_arguments,
    summary="rank the presets (and --config files) by whether they fit a GPU budget compute-optimally; "
    "why others do not",
    example="dsv3 select-config --gpus 8 --gpu-memory 80 --hours 48",
)
def run_select_config(args: argparse.Namespace) -> int:
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
    table = Table(title=f"Fits {budget} at {args.mfu:.0%} MFU (estimates)", title_justify="left",
                  show_edge=False)
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
        console.print(f"Largest that fits: [bold]{best}[/bold] (estimated memory and time). Every layout "
                      "listed is one `torchrun --nproc-per-node N -m dsv3 train` runs: put it in the run "
                      "config's parallel: section (docs/distributed.md).", soft_wrap=True)
    return 0 if fitting else 1


def _validate_chinchilla_arguments(p: argparse.ArgumentParser) -> None:
    add_config_flags(p, "repeatable; default: every preset")
    _add_ratio_flags(p)
    p.add_argument("--strict", action="store_true", help="exit 1 when any config is outside the range")


@command(
    "validate-chinchilla", order=82, arguments=_validate_chinchilla_arguments,
    summary=(
        "check that each config plans 20-26 training tokens per active parameter (steps x batch x "
        "seq_len)"
    ),
    example="dsv3 validate-chinchilla --config 1b --config configs/5b.yaml --strict",
)
def run_validate_chinchilla(args: argparse.Namespace) -> int:
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
