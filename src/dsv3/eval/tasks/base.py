"""What a task is: its items (prompts with what scoring them needs) and how a completion is judged."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["ChoiceItem", "GenerationItem", "Item", "Loader", "Task"]

Loader = Callable[[str, str], list[dict]]  # (dataset, split) → rows: dsv3.eval.data.load_dataset, cache bound


@dataclass(frozen=True)
class ChoiceItem:
    """A multiple-choice question, scored by the log-likelihood of each continuation after `context`."""

    id: str
    context: str
    choices: tuple[str, ...]  # continuations, each with its leading space (" A", " is ripping ...")
    gold: int


@dataclass(frozen=True)
class GenerationItem:
    """A prompt to complete; `doc` holds what scoring needs (gold answer, tests)."""

    id: str
    prompt: str
    doc: dict = field(repr=False)


Item = ChoiceItem | GenerationItem


@dataclass(frozen=True)
class Task:
    """One benchmark. `build(docs, num_fewshot, rng, load)` turns dataset rows into items.

    kind "choice": acc and acc_norm from log-likelihoods. kind "math": `check(doc, completion)` →
    metrics of one completion. kind "code": `program(doc, completion)` → the Python program whose
    clean exit means the completion passed.
    """

    name: str
    kind: Literal["choice", "math", "code"]
    dataset: str
    split: str
    default_fewshot: int
    max_fewshot: int | None  # None: as many as the few-shot source holds
    build: Callable[[list[dict], int, random.Random, Loader], list[Item]]
    fewshot_source: str  # for the docs and the results file
    stop: tuple[str, ...] = ()
    max_new_tokens: int = 0
    check: Callable[[dict, str], dict] | None = None
    program: Callable[[dict, str], str] | None = None
    reference: Callable[[dict], str] | None = None  # the dataset's own solution, as a completion
    per_subject_limit: bool = False  # --limit counts per subject (MMLU: 57 tasks in one)
