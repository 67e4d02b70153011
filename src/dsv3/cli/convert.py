"""convert: Hugging Face DeepSeek-V3 checkpoints in and out (dsv3.model.hf)."""

from __future__ import annotations

import argparse

from dsv3.cli.base import command, console, progress_bar


def _convert_arguments(p: argparse.ArgumentParser) -> None:
    p.description += """

dsv3 checkpoints already are Hugging Face DeepSeek-V3 directories, so both directions
rewrite one, tensor by tensor (never the whole model in memory): each tensor checked
against config.json, FP8 blocks dequantized, cast to --dtype, resharded at
--max-shard-size, config.json in canonical form, tokenizer/generation files copied.
  --from-hf  a published or third-party checkpoint (FP8 or not, rope_scaling or
             rope_parameters) -> a directory dsv3 trains and serves from
  --to-hf    a training checkpoint (a step_* dir, or a run's output_dir: see --which)
             -> a clean directory for transformers/vLLM, no trainer state; the sharded
             checkpoint of a distributed run is consolidated, one tensor at a time"""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="SRC", help="a Hugging Face checkpoint directory")
    src.add_argument("--to-hf", metavar="SRC", help="a dsv3 checkpoint (step_* dir) or a run output_dir")
    p.add_argument("--which", choices=["best", "last"], default="last",
                   help="--to-hf of a run directory: its last checkpoint, or the best by validation loss")
    p.add_argument("--to", required=True, metavar="DST", help="the directory to write (must not exist)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="weight dtype; auto = the config's (FP8 checkpoints: their declared dtype)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists (atomically)")


@command(
    "convert", order=70, arguments=_convert_arguments,
    summary=(
        "rewrite a Hugging Face DeepSeek-V3 checkpoint: import (FP8 dequantized) or export a training "
        "checkpoint"
    ),
    example="dsv3 convert --from-hf ~/models/DeepSeek-V3 --to models/dsv3-bf16 --dtype bfloat16",
)
def run_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dsv3.checkpoints import resolve_checkpoint
    from dsv3.model.hf import convert_hf

    src = resolve_checkpoint(args.to_hf, args.which) if args.to_hf else Path(args.from_hf)
    with progress_bar("converting") as progress:
        task = progress.add_task("tensors", total=None)
        cfg, n = convert_hf(src, args.to, dtype=args.dtype, max_shard_size=args.max_shard_size,
                            overwrite=args.overwrite, on_tensor=lambda _: progress.advance(task))
    console.print(f"wrote [bold]{args.to}[/bold]: {n:,} tensors from {src} "
                  f"({cfg.num_hidden_layers} layers, {cfg.num_nextn_predict_layers} MTP)", highlight=False)
    return 0
