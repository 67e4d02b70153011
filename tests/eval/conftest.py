"""What the eval tests share: a tiny random DeepSeek-V3 saved as a Hugging Face directory with a
trained dsv3 tokenizer, loadable by dsv3 and by transformers, and a few benchmark rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsv3.data.tokenizer import train_tokenizer
from tests.conftest import FIXTURE_TEXT, base_config, hf_model

VOCAB = 384

# A few rows in each dataset's cached layout (see dsv3.eval.data), written by the tests that need them.
MMLU_DEV = [
    {
        "id": f"{subject}/{i}",
        "subject": subject,
        "question": f"Which planet is number {i + 1} from the Sun?",
        "choices": ["Mercury", "Venus", "Earth", "Mars"],
        "answer": i % 4,
    }
    for subject in ("astronomy", "virology")
    for i in range(5)
]
MMLU_TEST = [
    {
        "id": "astronomy/0",
        "subject": "astronomy",
        "question": "What is the Sun?",
        "choices": ["A planet", "A star", "A moon", "A comet"],
        "answer": 1,
    },
    {
        "id": "astronomy/1",
        "subject": "astronomy",
        "question": "How many moons has Mars?",
        "choices": ["0", "1", "2", "3"],
        "answer": 2,
    },
    {
        "id": "virology/0",
        "subject": "virology",
        "question": "What does a virus need to replicate?",
        "choices": ["Light", "A host cell", "Oxygen", "Salt"],
        "answer": 1,
    },
]
HELLASWAG = [
    {
        "id": "0",
        "activity_label": "Roof shingle removal",
        "ctx_a": "A man is sitting on a roof.",
        "ctx_b": "he",
        "endings": [
            "is using wrap to wrap a pair of skis.",
            "is ripping level tiles off.",
            "is holding a rubik's cube.",
            "starts pulling up roofing on a roof.",
        ],
        "label": "3",
        "source_id": "x",
    },
    {
        "id": "1",
        "activity_label": "Baking cookies",
        "ctx_a": "A woman mixes flour and sugar [title] in a bowl.",
        "ctx_b": "she",
        "endings": [
            "puts the dough in the oven.",
            "drives a car  to work.",
            "sings a song.",
            "eats the bowl.",
        ],
        "label": "0",
        "source_id": "y",
    },
]


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    """transformers' DeepseekV3ForCausalLM with random weights (float32), saved with a byte-level BPE
    tokenizer trained by dsv3: a directory both `dsv3 eval --checkpoint` and `--hf` load."""
    path = tmp_path_factory.mktemp("tiny_hf")
    cfg = base_config(vocab_size=VOCAB, num_nextn_predict_layers=0)
    model = hf_model(cfg)
    model.save_pretrained(path)
    train_tokenizer([FIXTURE_TEXT.read_text(encoding="utf-8")] * 2, VOCAB, path)
    return path


@pytest.fixture(scope="session")
def reference_model(tiny_hf_dir):
    """The same model and tokenizer through transformers alone: the independent reference."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_hf_dir)
    return model, tokenizer


def write_cache(cache: Path, dataset: str, split: str, rows: list[dict]) -> None:
    """Rows where `load_dataset(dataset, split, cache)` finds them (the package's own are not read)."""
    from dsv3.eval.data import SOURCES, package_version

    package = SOURCES[dataset].package
    path = cache / f"{package}-{package_version(package)}" / dataset / f"{split}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


@pytest.fixture
def fixture_cache(tmp_path) -> Path:
    """A dataset cache holding the MMLU and HellaSwag rows above."""
    cache = tmp_path / "cache"
    write_cache(cache, "mmlu", "dev", MMLU_DEV)
    write_cache(cache, "mmlu", "test", MMLU_TEST)
    write_cache(cache, "hellaswag", "validation", HELLASWAG)
    return cache
