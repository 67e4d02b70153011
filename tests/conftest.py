"""What the test folders share: the small DeepSeek-V3 config, transformers' model of it, real shards and runs.

`BASE` has every feature the model has (q_lora, group-limited routing, a dense first layer, a
shared expert, MTP) at widths that are multiples of 16 bytes, so grouped_mm runs; v_head_dim ≠
qk_nope_head_dim so W_UK and W_UV cannot be mixed up.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from dsv3.config import ModelConfig, RunConfig, load_run_config
from dsv3.data.shards import IndexedDatasetWriter

BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=12,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    routed_scaling_factor=2.5,
    first_k_dense_replace=1,
    num_nextn_predict_layers=1,
    max_position_embeddings=256,
)

# YaRN 32 → 128 positions, with uneven mscales so the softmax scale and cos/sin factor both matter.
YARN = dict(
    type="yarn",
    factor=4.0,
    original_max_position_embeddings=32,
    beta_fast=32,
    beta_slow=1,
    mscale=1.0,
    mscale_all_dim=0.7,
)


def base_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**BASE, **overrides})


@pytest.fixture
def make_config() -> Callable[..., ModelConfig]:
    """`base_config`: BASE with the given keys changed."""
    return base_config


def hf_model(cfg: ModelConfig, seed: int = 0) -> transformers.DeepseekV3ForCausalLM:
    """transformers' DeepseekV3ForCausalLM of `cfg` with every tensor random, the router bias included
    (big enough to change which experts win): the independent reference for parity tests."""
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**cfg.to_hf_dict())).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                1 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.15 * torch.randn_like(p)
            )
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn_like(b))
    return model


# --- real shards and training runs ------------------------------------------------------------

# The `tiny` preset's features (q_lora, groups, dense first layer, shared expert, MTP) at a size
# where one CPU step takes a few milliseconds.
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

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_TEXT = FIXTURES / "tiny_corpus.txt"


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


def poison_loss(trainer, bad_steps: set[int]) -> None:
    """Make the trainer's loss NaN on the given (1-based) optimizer steps."""
    forward = trainer.model.forward_with_losses

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        if trainer.step + 1 in bad_steps:
            out.loss = out.loss * float("nan")
        return out

    trainer.model.forward_with_losses = poisoned


def traced_ops(fn: Callable, *args) -> set:
    """The functions in torch.compile's graph of `fn(*args)` (a recording backend, no Inductor): which
    path a compiled forward takes."""
    seen: set = set()

    def backend(gm: torch.fx.GraphModule, _inputs):
        seen.update(node.target for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend)(*args)
    return seen


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="Triton is not installed")


def run_under_triton_interpreter(script: str) -> None:
    """Run `script` in a fresh Python with TRITON_INTERPRET=1 (Triton kernels on CPU tensors); it must
    print "ok"."""
    root = Path(__file__).resolve().parents[1]
    path = f"{root / 'src'}:{root}:{os.environ.get('PYTHONPATH', '')}"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
