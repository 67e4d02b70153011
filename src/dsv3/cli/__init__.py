"""`dsv3 <command>`: one module per command group, registered with `@command`, listed in pipeline order.

    data.py      corpus, preprocess, tokenizer      raw documents → clean documents → shards
    train.py     train                              shards → checkpoints
    infer.py     generate, serve                    checkpoint → text (offline, or over HTTP)
    eval.py      eval                               checkpoint → benchmark scores
    convert.py   convert                            checkpoints ↔ Hugging Face
    scaling.py   plan, select-config, validate-chinchilla
"""

from __future__ import annotations

import argparse
import logging
import sys

from rich.markup import escape

from dsv3 import __version__
from dsv3.cli import convert, data, eval, infer, scaling, train  # noqa: F401  (each registers its commands)
from dsv3.cli.base import COMMANDS, Formatter, err_console
from dsv3.config import ConfigError

__all__ = ["main", "build_parser", "COMMANDS"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsv3",
        description="Build DeepSeek-V3-style models end to end: data, training, inference, scaling.",
        epilog="example:\n  dsv3 plan --config small\n\nEach command has its own --help.",
        formatter_class=Formatter,
    )
    parser.add_argument("--version", action="version", version=f"dsv3 {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for cmd in sorted(COMMANDS.values(), key=lambda c: c.order):
        p = sub.add_parser(
            cmd.name, help=cmd.summary, description=f"{cmd.summary}\n\nexample:\n  {cmd.example}",
            formatter_class=Formatter,
        )
        cmd.add_arguments(p)
        p.set_defaults(run=cmd.run)
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


if __name__ == "__main__":
    sys.exit(main())
