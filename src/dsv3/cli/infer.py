"""generate: continue a prompt with a checkpoint and its tokenizer (dsv3.infer)."""

from __future__ import annotations

import argparse

from rich.markup import escape

from dsv3.cli.base import command, console


def _generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a checkpoint directory, or a run's output_dir (see --which)")
    p.add_argument("--which", choices=["best", "last"], default="best",
                   help="for a run directory: the checkpoint with the best validation loss, or the last")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", metavar="FILE", help="tokenizer.json (default: the checkpoint's own)")


@command(
    "generate", order=50, arguments=_generate_arguments,
    summary="continue a prompt with a trained checkpoint, its tokenizer and the latent-cache decoder",
    example='dsv3 generate --checkpoint runs/demo --prompt "def parse_args(" --max-new-tokens 80',
)
def run_generate(args: argparse.Namespace) -> int:
    from dsv3.infer.text import generate_from_checkpoint

    text = generate_from_checkpoint(
        args.checkpoint, args.prompt, which=args.which, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed, tokenizer=args.tokenizer,
    )
    console.print(f"[bold]{escape(args.prompt)}[/bold]{escape(text)}", highlight=False)
    return 0
