"""How fast aux-loss-free balancing undoes the early router collapse, and at what loss.

Short CPU runs of the trainer where the collapse happens (docs/training.md): `micro` is the test micro
model of tests/train/make_reference_curve.py (8 experts, top-2, on tests/fixtures/tiny_corpus.txt);
`micro64` is the same width with `small`'s routing (64 experts, top-6, 8 groups / top-4, scaling 2.5)
on the demo shards, at the schedule of issue 13's `small` run. One JSON line per run: the step from
which every MoE layer stays at max/mean load ≤ 2, the mean max/mean over the last quarter of the steps,
the final LM and validation loss.

    PYTHONPATH=src python benchmarks/bias_update_rules.py --model micro64 --demo /work/main/data/demo \
        --seeds 1 2 --set train.bias_update_speed=0.0015

Commit 5049522 has the same script comparing bias-update rules (sign, proportional, sign_floor), with
the option it needs; docs/training.md has what it measured. Commit e2fda90 has the per-expert adaptive
(Rprop-style) rule, which this script runs there with its options as overrides:

    PYTHONPATH=src python benchmarks/bias_update_rules.py --model micro64 --demo /work/main/data/demo \
        --steps 300 --seeds 1 2 --set train.bias_update_rule=adaptive --set train.bias_adaptive_up=1.2 \
        --set train.bias_adaptive_down=0.5 --set train.bias_adaptive_min=0.01 --set train.bias_adaptive_max=10
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from dsv3.config import load_run_config
from dsv3.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.conftest import FIXTURE_TEXT, MICRO_MODEL, byte_documents, micro_run, write_shard  # noqa: E402

DEMO = Path("data/demo")
MICRO64 = [
    "model.n_routed_experts=64", "model.num_experts_per_tok=6", "model.n_group=8", "model.topk_group=4",
    "model.routed_scaling_factor=2.5", "model.moe_intermediate_size=16", "model.num_hidden_layers=3",
]


def run_config(model: str, workdir: Path, demo: Path, steps: int, overrides: list[str]):
    common = [f"train.steps={steps}", f"train.eval_every={steps}", f"train.save_every={steps}",
              "train.log_every=1", "train.sample_tokens=0", "train.tensorboard=false", "train.device=cpu"]
    if model == "micro":  # the reference curve's run (tests/train/make_reference_curve.py)
        docs = byte_documents(FIXTURE_TEXT.read_text(encoding="utf-8"))
        shards = workdir / "shards"
        write_shard(shards / "train" / "shard_00000", [d for i, d in enumerate(docs) if i % 10])
        write_shard(shards / "valid" / "shard_00000", [d for i, d in enumerate(docs) if not i % 10])
        return micro_run(workdir / "run", shards / "train", shards / "valid", "train.warmup_steps=10",
                         "train.lr=2e-3", *common, *overrides)
    return load_run_config("tiny", [
        *MICRO_MODEL, *MICRO64, "model.vocab_size=8192",
        f"data.train=[{demo / 'shards/train'}]", f"data.valid=[{demo / 'shards/valid'}]",
        f"data.tokenizer={demo / 'tokenizer/tokenizer.json'}", f"train.output_dir={workdir / 'run'}",
        # the schedule of issue 13's `small` run on the GPU (lr 1e-3, warmup 30, cosine over 300 steps)
        "train.global_batch_size=16", "train.micro_batch_size=16", "train.seq_len=64", "train.lr=1e-3",
        "train.warmup_steps=30", "train.eval_batches=8", *common, *overrides,
    ])


def measure(records: list[dict], val_loss: float, threshold: float = 2.0) -> dict:
    steps = [r for r in records if r["kind"] == "train"]
    imb = np.array([r["imbalance_max"] for r in steps])
    over = np.nonzero(imb > threshold)[0]
    last_over = over[-1] if over.size else -1
    balanced_from = None if last_over == len(imb) - 1 else steps[last_over + 1]["step"]
    q = max(len(imb) // 4, 1)
    return {
        "balanced_from": balanced_from,
        "peak": round(float(imb.max()), 2),
        "at": {s: round(float(imb[s - 1]), 2) for s in (10, 25, 50, 100, 150, 200, 250) if s <= len(imb)},
        "late_max_mean": round(float(imb[-q:].mean()), 3),
        "final_lm_loss": round(float(np.mean([r["lm_loss"] for r in steps[-10:]])), 4),
        "val_loss": round(val_loss, 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["micro", "micro64"], default="micro")
    ap.add_argument("--seeds", nargs="+", type=int, default=[1234])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--demo", type=Path, default=DEMO, help="the demo data directory (micro64)")
    ap.add_argument("--set", action="append", default=[], help="an override: train.bias_update_speed=0.01")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for seed in args.seeds:
        records: list[dict] = []
        with tempfile.TemporaryDirectory() as tmp:
            cfg = run_config(args.model, Path(tmp), args.demo, args.steps, [f"train.seed={seed}", *args.set])
            result = train(cfg, on_record=records.append)
        gamma = [r["bias_update_speed"] for r in records if r["kind"] == "train"]
        print(json.dumps({"model": args.model, "seed": seed, "steps": args.steps, "gamma_first": gamma[0],
                          "gamma_last": gamma[-1], "set": args.set, **measure(records, result.val_loss)}),
              flush=True)


if __name__ == "__main__":
    main()
