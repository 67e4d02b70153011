"""The benchmarks `dsv3 eval` runs, by name: prompt formats in choice.py, gsm8k.py and code.py."""

from __future__ import annotations

from dsv3.config import ConfigError
from dsv3.eval.tasks.base import ChoiceItem, GenerationItem, Item, Loader, Task
from dsv3.eval.tasks.choice import ARC_CHALLENGE, ARC_EASY, HELLASWAG, MMLU
from dsv3.eval.tasks.code import HUMANEVAL, MBPP
from dsv3.eval.tasks.gsm8k import GSM8K

__all__ = ["TASKS", "get_tasks", "Task", "ChoiceItem", "GenerationItem", "Item", "Loader"]

TASKS: dict[str, Task] = {
    t.name: t for t in (MMLU, HELLASWAG, ARC_EASY, ARC_CHALLENGE, GSM8K, HUMANEVAL, MBPP)
}


def get_tasks(names: str | list[str]) -> list[Task]:
    """Tasks by name ("mmlu,gsm8k" or a list); an unknown name is an error listing the known ones."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        raise ConfigError(f"no task given; expected some of {', '.join(TASKS)}")
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ConfigError(f"unknown task(s) {', '.join(unknown)}; expected some of {', '.join(TASKS)}")
    return [TASKS[n] for n in dict.fromkeys(names)]
