"""train: shards → checkpoints (dsv3.train), with the progress lines the trainer's records become.

Under torchrun every rank runs this command; rank 0 prints the progress and the summary, and any
rank that fails prints its own one-line error (or hands its traceback to torchrun), which ends the job.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from rich.markup import escape
from rich.table import Table

from dsv3.cli.base import command, console, err_console
from dsv3.config import ConfigError, load_run_config
from dsv3.scaling import human_count


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def format_progress(r: dict[str, Any], total_steps: int) -> str:
    """One rich-markup line for a `train` record; `loss` is the LM loss, comparable with validation."""
    parts = [
        f"[bold]step {r['step']:>{len(str(total_steps))}}/{total_steps}[/bold]",
        f"loss [cyan]{r['lm_loss']:.4f}[/cyan]",
    ]
    if r.get("mtp_loss"):
        parts.append(f"λ·mtp {r['mtp_loss']:.3f}")
    parts += [
        f"lr {r['lr']:.2e}",
        f"tokens {human_count(r['tokens'], 1)}",
        f"{human_count(r['tokens_per_s'], 1)} tok/s",
    ]
    if r.get("mfu") is not None:
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    if "imbalance_max" in r:
        parts.append(f"load max/mean {r['imbalance_max']:.2f}")
    if "ep_imbalance" in r:  # the busiest expert-parallel rank's rows over the mean rank's
        parts.append(f"ep rank max/mean {r['ep_imbalance']:.2f}")
    parts.append(f"ETA {_duration(r['eta_s'])}")
    return " │ ".join(parts)


def format_eval(r: dict[str, Any]) -> str:
    """One rich-markup line for an `eval` record, with the unigram baseline beside it."""
    line = f"[bold green]eval[/bold green] step {r['step']} │ val loss {r['val_loss']:.4f}"
    line += f" │ ppl {r['val_ppl']:.1f}"
    if r.get("unigram_loss") is not None:
        line += f" │ unigram baseline {r['unigram_loss']:.4f} (ppl {r['unigram_ppl']:.1f})"
    return line


def print_record(r: dict[str, Any], total_steps: int) -> None:
    kind = r["kind"]
    if kind == "run":
        resumed = f", resumed from {r['resumed_from']}" if r["resumed_from"] else ""
        where = f"{r['layout']} ({r['device']} on rank 0)" if r.get("layout") else r["device"]
        console.print(
            f"[bold]{r['name']}[/bold] on {where}{resumed}: {r['params'] / 1e6:.2f}M parameters "
            f"({r['active_params'] / 1e6:.2f}M active), {r['tokens_per_step']:,} tokens/step, "
            f"{r['train_windows']:,} train / {r['valid_windows']:,} valid windows, {r['precision']}, "
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


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, metavar="X", help="run config: YAML path or preset name")
    p.add_argument("--resume", metavar="DIR|auto",
                   help="a checkpoint or run directory to continue from (its last checkpoint), or auto: "
                   "the last complete one in train.output_dir")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key, e.g. train.steps=200; repeatable, last wins")


@command(
    "train", order=40, arguments=_train_arguments,
    summary=(
        "train a model on token shards: checkpoints, resume, evaluation, metrics and plots in "
        "train.output_dir; under torchrun, the layout in parallel:"
    ),
    example="torchrun --nproc-per-node 8 -m dsv3 train --config configs/1b.yaml --resume auto",
)
def run_train(args: argparse.Namespace) -> int:
    from torch.distributed.elastic.multiprocessing.errors import record

    from dsv3.train.trainer import TrainingDiverged, train

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if rank > 0:  # rank 0 speaks for the job; the others only warn
        logging.getLogger().setLevel(logging.WARNING)
    cfg = load_run_config(args.config, args.set)
    # Under torchrun, `record` hands an unexpected error's traceback to it, which names the failing rank.
    run = record(train) if "TORCHELASTIC_ERROR_FILE" in os.environ else train
    try:
        result = run(cfg, resume=args.resume, on_record=lambda r: print_record(r, cfg.train.steps))
    except (ConfigError, TrainingDiverged) as e:
        who = f"rank {rank}: " if world > 1 else ""
        err_console.print(f"[red]error:[/red] {who}{escape(str(e))}", highlight=False, soft_wrap=True)
        return 2 if isinstance(e, ConfigError) else 1
    if rank > 0:
        return 0
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
    per = " (largest rank)" if world > 1 else ""
    table.add_row("peak memory" + per, f"RSS {mem['peak_rss_gb']:.2f} GB{gpu}")
    table.add_row("KV cache per token (bf16)", f"{result.kv_cache_bytes_per_token:,} bytes")
    table.add_row("wall time", f"{result.wall_s:.0f} s")
    console.print(table)
    return 0
