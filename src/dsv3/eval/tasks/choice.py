"""Multiple-choice tasks: MMLU, HellaSwag, ARC-Easy and ARC-Challenge, in lm-evaluation-harness's formats.

    MMLU       The following are multiple choice questions (with answers) about {subject}.\\n\\n
               [k × "{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: {letter}\\n\\n"]
               {question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:        → " A" | " B" | " C" | " D"
    HellaSwag  {activity}: {ctx_a} {Ctx_b}                               → " {ending}"
    ARC        Question: {question}\\nAnswer:                             → " {choice}"

Few-shot examples come from MMLU's dev split (the first k of the subject), ARC's validation split
(k drawn with the seed), and for HellaSwag, whose train split is not shipped, from the other
validation items (k drawn with the seed).
"""

from __future__ import annotations

import random
import re

from dsv3.config import ConfigError
from dsv3.eval.tasks.base import ChoiceItem, Loader, Task

__all__ = ["MMLU", "HELLASWAG", "ARC_EASY", "ARC_CHALLENGE", "hellaswag_text"]

LETTERS = "ABCD"


def _mmlu_question(row: dict) -> str:
    options = "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, row["choices"], strict=True))
    return f"{row['question'].strip()}{options}\nAnswer:"


def _mmlu(docs: list[dict], k: int, rng: random.Random, load: Loader) -> list[ChoiceItem]:
    dev: dict[str, list[dict]] = {}
    for row in load("mmlu", "dev"):
        dev.setdefault(row["subject"], []).append(row)
    items = []
    for row in docs:
        shots = dev.get(row["subject"], [])[:k]
        if len(shots) < k:
            raise ConfigError(f"mmlu: {row['subject']} has {len(shots)} dev examples, --num-fewshot is {k}")
        subject = row["subject"].replace("_", " ")
        header = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        examples = "".join(f"{_mmlu_question(s)} {LETTERS[s['answer']]}\n\n" for s in shots)
        items.append(
            ChoiceItem(
                row["id"],
                header + examples + _mmlu_question(row),
                tuple(f" {letter}" for letter in LETTERS),
                row["answer"],
            )
        )
    return items


def hellaswag_text(text: str) -> str:
    """lm-eval's clean-up of HellaSwag text (WikiHow's bracketed artifacts, doubled spaces)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_item(row: dict) -> ChoiceItem:
    context = hellaswag_text(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
    return ChoiceItem(
        row["id"], context, tuple(f" {hellaswag_text(e)}" for e in row["endings"]), int(row["label"])
    )


def _sampled_shots(pool: list[ChoiceItem], k: int, rng: random.Random, exclude: str) -> str:
    if k >= len(pool):
        raise ConfigError(
            f"--num-fewshot {k}: only {len(pool) - 1} few-shot examples to draw from besides the item"
        )
    picks = rng.sample(range(len(pool)), k + 1)  # one spare, in case the item itself is drawn
    shots = [pool[j] for j in picks if pool[j].id != exclude][:k]
    return "".join(f"{s.context}{s.choices[s.gold]}\n\n" for s in shots)


def _hellaswag(docs: list[dict], k: int, rng: random.Random, load: Loader) -> list[ChoiceItem]:
    items = [_hellaswag_item(row) for row in docs]
    if not k:
        return items
    pool = [_hellaswag_item(row) for row in load("hellaswag", "validation")]
    return [
        ChoiceItem(i.id, _sampled_shots(pool, k, rng, i.id) + i.context, i.choices, i.gold) for i in items
    ]


def _arc_item(row: dict) -> ChoiceItem:
    return ChoiceItem(
        row["id"],
        f"Question: {row['question']}\nAnswer:",
        tuple(f" {c}" for c in row["choices"]),
        row["gold"],
    )


def _arc(dataset: str):
    def build(docs: list[dict], k: int, rng: random.Random, load: Loader) -> list[ChoiceItem]:
        items = [_arc_item(row) for row in docs]
        if not k:
            return items
        pool = [_arc_item(row) for row in load(dataset, "validation")]
        return [
            ChoiceItem(i.id, _sampled_shots(pool, k, rng, i.id) + i.context, i.choices, i.gold) for i in items
        ]

    return build


MMLU = Task(
    "mmlu", "choice", "mmlu", "test", 5, 5, _mmlu, "dev split, first k of the subject", per_subject_limit=True
)
HELLASWAG = Task(
    "hellaswag",
    "choice",
    "hellaswag",
    "validation",
    0,
    None,
    _hellaswag,
    "other validation items, drawn with the seed",
)
ARC_EASY = Task(
    "arc_easy",
    "choice",
    "arc_easy",
    "test",
    0,
    None,
    _arc("arc_easy"),
    "validation split, drawn with the seed",
)
ARC_CHALLENGE = Task(
    "arc_challenge",
    "choice",
    "arc_challenge",
    "test",
    0,
    None,
    _arc("arc_challenge"),
    "validation split, drawn with the seed",
)
