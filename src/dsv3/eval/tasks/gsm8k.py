"""GSM8K, 8-shot chain of thought (Wei et al. 2022's exemplars, lm-evaluation-harness's `gsm8k_cot`).

    Q: {exemplar question}\\nA: {reasoning} The answer is {n}.\\n\\n   × k
    Q: {question}\\nA:                                                 → generated until "Q:" or a blank line

Answer extraction is lm-eval's: `strict` takes the number after "The answer is", `flexible`
the last number in the completion; both are compared with the gold answer (the text after
"####") once commas, dollar signs, a trailing period and anything up to "#### " are removed.
"""

from __future__ import annotations

import random
import re

from dsv3.eval.tasks.base import GenerationItem, Loader, Task

__all__ = ["GSM8K", "EXEMPLARS", "extract_strict", "extract_flexible", "normalize", "gold_answer", "check"]

# (question, chain of thought ending in "The answer is N.")
EXEMPLARS: tuple[tuple[str, str], ...] = (
    (
        "There are 15 trees in the grove. Grove workers will plant trees in the grove today. After "
        "they are done, there will be 21 trees. How many trees did the grove workers plant today?",
        "There are 15 trees originally. Then there were 21 trees after some more were planted. So "
        "there must have been 21 - 15 = 6. The answer is 6.",
    ),
    (
        "If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the "
        "parking lot?",
        "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5.",
    ),
    (
        "Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have"
        " left in total?",
        "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. "
        "After eating 35, they had 74 - 35 = 39. The answer is 39.",
    ),
    (
        "Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many"
        " lollipops did Jason give to Denny?",
        "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave "
        "Denny 20 - 12 = 8. The answer is 8.",
    ),
    (
        "Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many "
        "toys does he have now?",
        "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more"
        " toys. 5 + 4 = 9. The answer is 9.",
    ),
    (
        "There were nine computers in the server room. Five more computers were installed each day,"
        " from monday to thursday. How many computers are now in the server room?",
        "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 *"
        " 4 = 20 computers were added. 9 + 20 is 29. The answer is 29.",
    ),
    (
        "Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 "
        "more. How many golf balls did he have at the end of wednesday?",
        "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After"
        " losing 2 more, he had 35 - 2 = 33 golf balls. The answer is 33.",
    ),
    (
        "Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
        "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has "
        "23 - 15 dollars left. 23 - 15 is 8. The answer is 8.",
    ),
)

STRICT = re.compile(r"The answer is (\-?[0-9\.\,]+).")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORED = (re.compile(","), re.compile(r"\$"), re.compile(r"(?s).*#### "), re.compile(r"\.$"))
INVALID = "[invalid]"


def _first_group(match: str | tuple[str, ...]) -> str:
    return next((m for m in match if m), "") if isinstance(match, tuple) else match


def extract_strict(completion: str) -> str:
    found = STRICT.findall(completion)
    return _first_group(found[0]).strip() if found else INVALID


def extract_flexible(completion: str) -> str:
    found = FLEXIBLE.findall(completion)
    return _first_group(found[-1]).strip() if found else INVALID


def normalize(answer: str) -> str:
    for pattern in IGNORED:
        answer = pattern.sub("", answer)
    return answer.strip().lower()


def gold_answer(doc: dict) -> str:
    return doc["answer"].split("####")[-1].strip()


def check(doc: dict, completion: str) -> dict:
    """Metrics of one completion: exact_match (strict extraction) and exact_match_flex."""
    gold = normalize(gold_answer(doc))
    strict, flexible = extract_strict(completion), extract_flexible(completion)
    return {
        "exact_match": float(normalize(strict) == gold),
        "exact_match_flex": float(normalize(flexible) == gold),
        "extracted": strict,
        "extracted_flex": flexible,
        "gold": gold_answer(doc),
    }


def reference(doc: dict) -> str:
    """The dataset's own solution as a completion in the exemplars' style."""
    reasoning = re.sub(r"<<.*?>>", "", doc["answer"].split("####")[0]).strip().replace("\n", " ")
    return f" {reasoning} The answer is {gold_answer(doc)}."


def _build(docs: list[dict], k: int, rng: random.Random, load: Loader) -> list[GenerationItem]:
    shots = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in EXEMPLARS[:k])
    return [GenerationItem(row["id"], f"{shots}Q: {row['question']}\nA:", row) for row in docs]


GSM8K = Task(
    "gsm8k",
    "math",
    "gsm8k",
    "test",
    8,
    len(EXEMPLARS),
    _build,
    "Wei et al. 2022's 8 exemplars, first k",
    stop=("Q:", "</s>", "<|im_end|>", "\n\n"),
    max_new_tokens=256,
    check=check,
    reference=reference,
)
