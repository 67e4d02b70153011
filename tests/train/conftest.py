"""Shared fixtures for the trainer tests: real .bin/.idx shards and a model smaller than `tiny`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dsv3.config import RunConfig, load_run_config
from dsv3.data.shards import IndexedDatasetWriter

# Every DeepSeek-V3 feature of `tiny` (q_lora, groups, dense first layer, shared expert, MTP) at a
# size where one CPU step takes a few milliseconds.
MICRO_MODEL = [
    "model.vocab_size=256",
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "model.moe_intermediate_size=32",
    "model.num_hidden_layers=2",
    "model.num_attention_heads=2",
    "model.q_lora_rank=32",
    "model.kv_lora_rank=32",
    "model.qk_nope_head_dim=16",
    "model.qk_rope_head_dim=8",
    "model.v_head_dim=16",
]

FIXTURE_TEXT = Path(__file__).parents[1] / "fixtures" / "tiny_corpus.txt"


def byte_documents(text: str) -> list[np.ndarray]:
    """Paragraphs as byte-level token documents, each ending in EOS (= 0, absent from the text)."""
    docs = [p.encode() for p in text.split("\n\n") if p.strip()]
    return [np.frombuffer(d + b"\x00", dtype=np.uint8).astype(np.uint16) for d in docs]


def write_shard(prefix: Path, docs: list[np.ndarray]) -> Path:
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for doc in docs:
            w.add_document(doc)
    return prefix


@pytest.fixture
def corpus_shards(tmp_path: Path) -> tuple[Path, Path]:
    """Train and valid shard directories of the fixed tiny corpus (every 10th paragraph is valid)."""
    docs = byte_documents(FIXTURE_TEXT.read_text(encoding="utf-8"))
    train = [d for i, d in enumerate(docs) if i % 10]
    valid = [d for i, d in enumerate(docs) if not i % 10]
    return (
        write_shard(tmp_path / "shards" / "train" / "shard_00000", train).parent,
        write_shard(tmp_path / "shards" / "valid" / "shard_00000", valid).parent,
    )


def micro_run(output_dir: Path, train: Path, valid: Path | None, *overrides: str) -> RunConfig:
    """The `tiny` preset shrunk to MICRO_MODEL, on the given shards, with quick eval/save cadence."""
    base = [
        *MICRO_MODEL,
        f"data.train=[{train}]",
        f"data.valid=[{valid}]" if valid is not None else "data.valid=[]",
        f"train.output_dir={output_dir}",
        "train.steps=12",
        "train.global_batch_size=8",
        "train.micro_batch_size=4",
        "train.seq_len=32",
        "train.warmup_steps=3",
        "train.lr=3e-3",
        "train.log_every=1",
        "train.eval_every=6",
        "train.save_every=6",
        "train.eval_batches=2",
        "train.tensorboard=false",
        "train.device=cpu",
    ]
    return load_run_config("tiny", [*base, *overrides])
