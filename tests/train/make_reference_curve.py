"""The reference training curve that CI holds the trainer to (tests/fixtures/reference_curve.json).

A short deterministic CPU run of the test micro model (the `tiny` preset's features at a width of 64) on
tests/fixtures/tiny_corpus.txt with the trainer's defaults: its per-step LM loss and busiest-expert load
are stored, and tests/train/test_reference_curve.py reruns it and compares. Regenerate, from the
repository root, only when a change is meant to move the curve, and say why in the commit message:

    PYTHONPATH=src python -m tests.train.make_reference_curve
"""

from __future__ import annotations

import platform
import tempfile
from pathlib import Path

import torch

from dsv3.io import write_json_atomic
from dsv3.train.trainer import train
from tests.conftest import FIXTURE_TEXT, FIXTURES, byte_documents, micro_run, write_shard

CURVE_FILE = FIXTURES / "reference_curve.json"
STEPS = 120
# Everything else is the `tiny` preset's and TrainConfig's defaults (balance settings included).
OVERRIDES = [
    f"train.steps={STEPS}", f"train.eval_every={STEPS}", f"train.save_every={STEPS}", "train.warmup_steps=10",
    "train.lr=2e-3", "train.log_every=1", "train.sample_tokens=0",
]


def reference_run(workdir: Path) -> dict:
    """Train the reference run in `workdir` on one CPU thread; its curve as stored in CURVE_FILE."""
    docs = byte_documents(FIXTURE_TEXT.read_text(encoding="utf-8"))
    shards = workdir / "shards"
    write_shard(shards / "train" / "shard_00000", [d for i, d in enumerate(docs) if i % 10])
    write_shard(shards / "valid" / "shard_00000", [d for i, d in enumerate(docs) if not i % 10])
    records: list[dict] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same float reductions on any machine's core count
    try:
        cfg = micro_run(workdir / "run", shards / "train", shards / "valid", *OVERRIDES)
        result = train(cfg, on_record=records.append)
    finally:
        torch.set_num_threads(threads)
    steps = [r for r in records if r["kind"] == "train"]
    return {
        "steps": [r["step"] for r in steps],
        "lm_loss": [round(r["lm_loss"], 5) for r in steps],
        "imbalance_max": [round(r["imbalance_max"], 3) for r in steps],
        "val_loss": round(result.val_loss, 5),
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        curve = reference_run(Path(tmp))
    curve = {
        "about": "the micro model's per-step LM loss and max/mean expert load under the trainer's "
        "defaults; regenerate with `PYTHONPATH=src python -m tests.train.make_reference_curve` and say "
        "why in the commit",
        "overrides": OVERRIDES,
        "torch": torch.__version__,
        "machine": platform.machine(),
        **curve,
    }
    write_json_atomic(CURVE_FILE, curve, indent=1)
    print(f"wrote {CURVE_FILE} ({CURVE_FILE.stat().st_size} bytes): {STEPS} steps, "
          f"final LM loss {curve['lm_loss'][-1]}, validation loss {curve['val_loss']}")


if __name__ == "__main__":
    main()
