"""Code tasks, scored by running the completion against the dataset's tests in the sandbox.

HumanEval  {signature and docstring}                     → body, until a new top-level statement
           program: prompt + completion + test + check(entry_point)
MBPP       lm-evaluation-harness's `mbpp` format, 3-shot (task ids 2, 3, 4 of the prompt split):
           You are an expert Python programmer, and here is your task: {text} Your code should
           pass these tests:\\n\\n{test 1}\\n{test 2}\\n{test 3}\\n[BEGIN]\\n  → code, until "[DONE]"
           program: completion + test_setup_code + the tests
"""

from __future__ import annotations

import random

from dsv3.eval.tasks.base import GenerationItem, Loader, Task

__all__ = ["HUMANEVAL", "MBPP", "MBPP_EXEMPLARS", "humaneval_program", "mbpp_program"]


def humaneval_program(doc: dict, completion: str) -> str:
    return f"{doc['prompt']}{completion}\n{doc['test']}\ncheck({doc['entry_point']})\n"


def _humaneval(docs: list[dict], k: int, rng: random.Random, load: Loader) -> list[GenerationItem]:
    return [GenerationItem(row["id"], row["prompt"], row) for row in docs]


# MBPP's prompt split, task ids 2-4: the few-shot examples of the original paper and of lm-eval.
MBPP_EXEMPLARS: tuple[dict, ...] = (
    {
        "text": "Write a function to find the similar elements from the given two tuple lists.",
        "code": "def similar_elements(test_tup1, test_tup2):\n"
        "  res = tuple(set(test_tup1) & set(test_tup2))\n  return (res) ",
        "test_list": [
            "assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)",
            "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)",
            "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)",
        ],
    },
    {
        "text": "Write a python function to identify non-prime numbers.",
        "code": "import math\ndef is_not_prime(n):\n    result = False\n"
        "    for i in range(2,int(math.sqrt(n)) + 1):\n        if n % i == 0:\n            result = True\n"
        "    return result",
        "test_list": [
            "assert is_not_prime(2) == False",
            "assert is_not_prime(10) == True",
            "assert is_not_prime(35) == True",
        ],
    },
    {
        "text": "Write a function to find the largest integers from a given list of numbers using heap queue "
        "algorithm.",
        "code": "import heapq as hq\ndef heap_queue_largest(nums,n):\n  largest_nums = hq.nlargest(n, nums)\n"
        "  return largest_nums",
        "test_list": [
            "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],3)==[85, 75, 65] ",
            "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],2)==[85, 75] ",
            "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],5)==[85, 75, 65, 58, 35]",
        ],
    },
)


def _mbpp_query(doc: dict) -> str:
    tests = "\n".join(doc["test_list"])
    return (
        f"You are an expert Python programmer, and here is your task: {doc['text']} "
        f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n"
    )


def mbpp_program(doc: dict, completion: str) -> str:
    tests = "\n".join(doc["test_list"])
    # The setup code builds test inputs, some from classes the solution defines: it goes after it.
    return f"{completion}\n{doc.get('test_setup_code') or ''}\n{tests}\n"


def _mbpp(docs: list[dict], k: int, rng: random.Random, load: Loader) -> list[GenerationItem]:
    shots = "".join(f"{_mbpp_query(s)}{s['code']}\n[DONE]\n\n" for s in MBPP_EXEMPLARS[:k])
    return [GenerationItem(row["id"], shots + _mbpp_query(row), row) for row in docs]


HUMANEVAL = Task(
    "humaneval",
    "code",
    "humaneval",
    "test",
    0,
    0,
    _humaneval,
    "none (0-shot)",
    stop=("\nclass", "\ndef", "\n#", "\nif", "\nprint"),
    max_new_tokens=512,
    program=humaneval_program,
    reference=lambda doc: doc["canonical_solution"],
)
MBPP = Task(
    "mbpp",
    "code",
    "mbpp",
    "test",
    3,
    len(MBPP_EXEMPLARS),
    _mbpp,
    "prompt split task ids 2-4, first k",
    stop=("[DONE]",),
    max_new_tokens=512,
    program=mbpp_program,
    reference=lambda doc: doc["code"],
)
