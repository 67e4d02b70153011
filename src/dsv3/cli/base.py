"""What every command module shares: the `@command` registry, the consoles, common flags and progress bars.

A command is a function `run(args) -> exit code` registered with `@command(...)`, which names it,
gives its one-line summary and a working example, the function that declares its flags, and its
place in the pipeline order that `dsv3 --help` lists. Library code logs; only the CLI prints.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dsv3.config import ConfigError

__all__ = [
    "Command",
    "COMMANDS",
    "command",
    "console",
    "err_console",
    "Formatter",
    "add_config_flags",
    "progress_bar",
    "positive",
]

console = Console()
err_console = Console(stderr=True)

AddArguments = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


@dataclass(frozen=True)
class Command:
    name: str
    summary: str
    example: str
    order: int  # place in the pipeline: corpus → preprocess → … → scaling tools
    add_arguments: AddArguments
    run: Run


COMMANDS: dict[str, Command] = {}


def command(
    name: str, *, order: int, summary: str, example: str, arguments: AddArguments
) -> Callable[[Run], Run]:
    """Register the decorated `run(args)` as `dsv3 <name>`."""

    def register(run: Run) -> Run:
        if name in COMMANDS:
            raise RuntimeError(f"dsv3 {name}: registered twice")
        COMMANDS[name] = Command(name, summary, example, order, arguments, run)
        return run

    return register


def add_config_flags(p: argparse.ArgumentParser, what: str, repeatable: bool = True) -> None:
    """--config (a preset name or YAML path) and --set KEY=VALUE overrides."""
    if repeatable:
        p.add_argument("--config", action="append", metavar="X", help=f"preset name or YAML path; {what}")
    else:
        p.add_argument("--config", required=True, metavar="X", help=f"preset name or YAML path; {what}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the config, e.g. train.seq_len=8192; repeatable, last wins")


def progress_bar(what: str) -> Progress:
    """A transient progress bar on stderr (stdout stays clean for results and --json)."""
    return Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err_console, transient=True)


def positive(flag: str, value: int | None) -> None:
    """A flag that must be ≥ 1 when given."""
    if value is not None and value < 1:
        raise ConfigError(f"{flag} {value}: must be positive")
