"""`dsv3 <command>`: each command parses its flags, calls one library function, and prints.

Commands are registered in `COMMANDS`; each has an `add_<name>` that declares its flags (with
an example in its help) and a `run_<name>` that does the work. Library code logs; only this
module prints.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from rich.console import Console

from dsv3 import __version__
from dsv3.config import ConfigError

console = Console()
err_console = Console(stderr=True)


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def _command(sub: argparse._SubParsersAction, name: str, summary: str, example: str) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=summary,
        description=f"{summary}\n\nexample:\n  {example}",
        formatter_class=_Formatter,
    )


# Each entry: (name, summary, example, add_arguments, run). Filled below by the command blocks.
COMMANDS: list[tuple[str, str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = []


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
        err_console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
