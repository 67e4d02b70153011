"""Prompt formats and answer extraction: hand-written GSM8K cases, lm-eval's exemplars, code programs."""

from __future__ import annotations

import ast
import random
from pathlib import Path

import lm_eval
import pytest
import yaml

from dsv3.config import ConfigError
from dsv3.eval.tasks import TASKS, get_tasks
from dsv3.eval.tasks.choice import hellaswag_text
from dsv3.eval.tasks.code import MBPP_EXEMPLARS
from dsv3.eval.tasks.gsm8k import EXEMPLARS, check, extract_flexible, extract_strict, normalize, reference

DOC = {"question": "How many?", "answer": "She has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"}


@pytest.mark.parametrize(
    "completion, strict, flexible, strict_ok, flexible_ok",
    [
        (" She has 3 + 4 = 7 apples. The answer is 7.", "7", "7.", True, True),
        (" 3 + 4 = 7. The answer is 7", "[invalid]", "7", False, True),  # strict wants a character after it
        (" The answer is 7.\n\nQ: next", "7", "7.", True, True),
        (" The answer is $7.", "[invalid]", "$7.", False, True),
        (" I think it is 8, no wait, 7", "[invalid]", "7", False, True),
        (" The answer is 1,007.", "1,007", "1,007.", False, False),
        (" the answer is 7.", "[invalid]", "7.", False, True),  # lm-eval's strict match is case-sensitive
        (" The answer is 7. Then 12 more.", "7.", "12", True, False),
        (" The answer is -3.", "-3", "-3.", False, False),
        ("", "[invalid]", "[invalid]", False, False),
    ],
)
def test_gsm8k_answer_extraction(completion, strict, flexible, strict_ok, flexible_ok):
    assert extract_strict(completion) == strict
    assert extract_flexible(completion) == flexible
    result = check(DOC, completion)
    assert (result["exact_match"], result["exact_match_flex"]) == (float(strict_ok), float(flexible_ok))


def test_gsm8k_normalization_and_gold():
    assert normalize("$1,234.") == "1234"
    assert normalize("blah #### 42") == "42"
    assert check({"answer": "#### 1,234"}, "The answer is 1234.")["exact_match"] == 1.0
    assert reference(DOC) == " She has 3 + 4 = 7 apples. The answer is 7."
    assert check(DOC, reference(DOC))["exact_match"] == 1.0


def test_gsm8k_exemplars_are_lm_evals_gsm8k_cot():
    path = Path(lm_eval.__file__).parent / "tasks/gsm8k/gsm8k-cot.yaml"
    samples = yaml.safe_load(path.read_text())["fewshot_config"]["samples"]
    assert [(s["question"], s["target"]) for s in samples] == list(EXEMPLARS)


def test_gsm8k_prompt_is_eight_shot():
    item = TASKS["gsm8k"].build([{"id": "1", **DOC}], 8, random.Random(0), None)[0]
    assert item.prompt.count("Q: ") == 9 and item.prompt.endswith("Q: How many?\nA:")
    assert item.prompt.startswith("Q: There are 15 trees in the grove.")


def test_mbpp_exemplars_are_lm_evals():
    """lm-eval's mbpp/utils.py loads a metric from the Hub at import: read its literal list instead."""
    tree = ast.parse((Path(lm_eval.__file__).parent / "tasks/mbpp/utils.py").read_text())
    function = next(
        n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "list_fewshot_samples"
    )
    samples = ast.literal_eval(next(n for n in ast.walk(function) if isinstance(n, ast.Return)).value)
    theirs = [
        {"text": s["text"], "code": s["code"].replace("\r\n", "\n"), "test_list": s["test_list"]}
        for s in samples
    ]
    assert theirs == list(MBPP_EXEMPLARS)


def test_hellaswag_cleanup_and_mmlu_format():
    assert hellaswag_text(" A man [title] is  here [step] now ") == "A man. is here now"
    rows = [
        {
            "id": "x/0",
            "subject": "high_school_physics",
            "question": " What? ",
            "choices": list("1234"),
            "answer": 2,
        }
    ]
    item = TASKS["mmlu"].build(rows, 0, random.Random(0), lambda d, s: [])[0]
    assert item.context == (
        "The following are multiple choice questions (with answers) about high school physics."
        "\n\nWhat?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"
    )
    assert item.choices == (" A", " B", " C", " D") and item.gold == 2


def test_few_shot_draws_follow_the_seed_and_skip_the_item():
    pool = [{"id": str(i), "question": f"q{i}", "choices": ["a", "b"], "gold": i % 2} for i in range(6)]
    build = TASKS["arc_easy"].build
    one = build(pool[:2], 3, random.Random(1), lambda d, s: pool)
    assert one == build(pool[:2], 3, random.Random(1), lambda d, s: pool)
    assert one != build(pool[:2], 3, random.Random(2), lambda d, s: pool)
    for item in one:
        assert item.context.count("Question:") == 4
        assert item.context.count(f"Question: q{item.id}\n") == 1  # never its own example
    with pytest.raises(ConfigError, match="only 5 few-shot examples to draw from besides the item"):
        build(pool[:1], 6, random.Random(0), lambda d, s: pool)


def test_task_names():
    assert [t.name for t in get_tasks("gsm8k, mmlu,gsm8k")] == ["gsm8k", "mmlu"]
    with pytest.raises(ConfigError, match="unknown task.*squad.*expected some of mmlu"):
        get_tasks("squad")
