"""`dsv3 eval` end to end on a tiny model: per-question log-likelihoods equal transformers', the outputs,
--predictions and reference completions, and one-line errors."""

from __future__ import annotations

import json
import shlex

import pytest

from dsv3.cli import COMMANDS, main
from tests.eval.test_lm import reference_logprob


def _eval(capsys, *argv) -> tuple[int, str, str]:
    code = main(["eval", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def _samples(folder, task: str) -> list[dict]:
    return [json.loads(line) for line in (folder / f"samples_{task}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("source", ["--checkpoint", "--hf"])
def test_mmlu_and_hellaswag_log_likelihoods_equal_transformers(
    source, tiny_hf_dir, fixture_cache, reference_model, tmp_path, capsys
):
    out = tmp_path / "out"
    code, stdout, _ = _eval(
        capsys,
        source,
        tiny_hf_dir,
        "--tasks",
        "mmlu,hellaswag",
        "--cache-dir",
        fixture_cache,
        "--output",
        out,
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--num-fewshot",
        "1",
    )
    assert code == 0
    model, tokenizer = reference_model
    for task, n in (("mmlu", 3), ("hellaswag", 2)):
        samples = _samples(out, task)
        assert len(samples) == n
        for s in samples:
            expected = [reference_logprob(model, tokenizer, s["context"], c) for c in s["choices"]]
            assert s["logprobs"] == pytest.approx(expected, abs=2e-4)
            assert s["pred"] == max(range(len(expected)), key=expected.__getitem__)
            assert s["acc"] == float(s["pred"] == s["gold"])
    results = json.loads((out / "results.json").read_text())
    mmlu = results["tasks"]["mmlu"]
    assert mmlu["n"] == 3 and mmlu["num_fewshot"] == 1
    assert mmlu["metrics"]["acc"] == pytest.approx(sum(s["acc"] for s in _samples(out, "mmlu")) / 3)
    assert "| mmlu | acc |" in (out / "results.md").read_text() and "| hellaswag | acc_norm |" in stdout


def test_limit_counts_per_mmlu_subject(tiny_hf_dir, fixture_cache, tmp_path, capsys):
    code, _, _ = _eval(
        capsys,
        "--checkpoint",
        tiny_hf_dir,
        "--tasks",
        "mmlu",
        "--limit",
        "1",
        "--cache-dir",
        fixture_cache,
        "--output",
        tmp_path / "out",
        "--device",
        "cpu",
    )
    assert code == 0
    assert [s["id"] for s in _samples(tmp_path / "out", "mmlu")] == ["astronomy/0", "virology/0"]


def test_generated_samples_score_again_as_predictions(tiny_hf_dir, tmp_path, capsys):
    first, again = tmp_path / "first", tmp_path / "again"
    code, _, _ = _eval(
        capsys,
        "--checkpoint",
        tiny_hf_dir,
        "--tasks",
        "gsm8k,humaneval",
        "--limit",
        "2",
        "--max-new-tokens",
        "8",
        "--output",
        first,
        "--device",
        "cpu",
        "--cache-dir",
        tmp_path / "c",
    )
    assert code == 0
    for task in ("gsm8k", "humaneval"):
        code, _, _ = _eval(
            capsys,
            "--predictions",
            first / f"samples_{task}.jsonl",
            "--tasks",
            task,
            "--limit",
            "2",
            "--output",
            again,
            "--cache-dir",
            tmp_path / "c",
        )
        assert code == 0
        before = json.loads((first / "results.json").read_text())["tasks"][task]["metrics"]
        assert json.loads((again / "results.json").read_text())["tasks"][task]["metrics"] == before
        assert [s["completion"] for s in _samples(again, task)] == [
            s["completion"] for s in _samples(first, task)
        ]


def test_reference_completions_score_perfectly(tmp_path, capsys):
    refs = tmp_path / "refs.jsonl"
    common = ("--limit", "5", "--cache-dir", tmp_path / "c")
    assert _eval(capsys, "--write-references", refs, "--tasks", "gsm8k,humaneval,mbpp", *common)[0] == 0
    code, stdout, _ = _eval(
        capsys,
        "--predictions",
        refs,
        "--tasks",
        "gsm8k,humaneval,mbpp",
        "--output",
        tmp_path / "out",
        *common,
    )
    assert code == 0
    tasks = json.loads((tmp_path / "out/results.json").read_text())["tasks"]
    assert {name: t["metrics"] for name, t in tasks.items()} == {
        "gsm8k": {"exact_match": 1.0, "exact_match_flex": 1.0},
        "humaneval": {"pass@1": 1.0},
        "mbpp": {"pass@1": 1.0},
    }
    assert all(t["n"] == 5 for t in tasks.values())


@pytest.mark.parametrize(
    "argv, error",
    [
        (
            ["--tasks", "mmlu"],
            "mmlu is scored by log-likelihoods: --predictions works for gsm8k, humaneval, mbpp",
        ),
        (["--tasks", "mbpp"], "no predictions for task mbpp"),
        (["--tasks", "squad"], "unknown task(s) squad"),
        (
            ["--tasks", "gsm8k", "--num-fewshot", "9"],
            "gsm8k: --num-fewshot 9, but it has 8 few-shot examples",
        ),
        (["--tasks", "gsm8k", "--limit", "0"], "--limit: Input should be greater than or equal to 1"),
    ],
)
def test_bad_requests_are_one_line_errors(argv, error, tmp_path, capsys):
    predictions = tmp_path / "p.jsonl"
    predictions.write_text(json.dumps({"task": "gsm8k", "id": "0", "completion": "The answer is 18."}) + "\n")
    code, _, err = _eval(
        capsys, "--predictions", predictions, *argv, "--output", tmp_path / "o", "--cache-dir", tmp_path / "c"
    )
    assert code == 2 and error in " ".join(err.split())


def test_malformed_or_unknown_predictions_name_the_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task": "gsm8k", "id": "0", "completion": "x"}\n{"task": "gsm8k", "id": "1"}\n')
    code, _, err = _eval(capsys, "--predictions", bad, "--tasks", "gsm8k", "--cache-dir", tmp_path / "c")
    assert (
        code == 2 and "bad.jsonl:2: a prediction needs task, id and completion; missing 'completion'" in err
    )
    bad.write_text('{"task": "gsm8k", "id": "no-such-id", "completion": "x"}\n')
    code, _, err = _eval(capsys, "--predictions", bad, "--tasks", "gsm8k", "--cache-dir", tmp_path / "c")
    assert code == 2 and "gsm8k has no item 'no-such-id'" in err


def test_sampling_needs_a_temperature(tiny_hf_dir, tmp_path, capsys):
    code, _, err = _eval(
        capsys,
        "--checkpoint",
        tiny_hf_dir,
        "--tasks",
        "humaneval",
        "--samples",
        "4",
        "--device",
        "cpu",
        "--cache-dir",
        tmp_path / "c",
    )
    assert code == 2 and "--samples 4 with --temperature 0" in err


def test_eval_is_registered_with_a_real_example():
    example = shlex.split(COMMANDS["eval"].example)
    assert example[:2] == ["dsv3", "eval"] and COMMANDS["eval"].order == 60
