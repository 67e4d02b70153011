"""Multiple-choice scoring speed: `dsv3 eval`'s CausalLM vs lm-evaluation-harness's HFLM, same model.

HellaSwag validation items (4 continuations each) scored by log-likelihood with a randomly
initialised model of the given preset and a byte-level BPE trained on the items' own text (the
numbers measure the scorer, not the model). Systems, all in one process on the same weights:

    dsv3        CausalLM over dsv3's Transformer (batches packed by length, lm_head on scored positions)
    dsv3-hf     CausalLM over transformers' DeepseekV3ForCausalLM (full logits)
    lm-eval     lm-eval's HFLM over the same transformers model (its own batching, --batch-size)

One JSON line per system: requests/s, seconds, acc_norm on the items (equal across systems up to
near-ties: HFLM conditions on no prefix token where CausalLM puts the EOS first).

    python benchmarks/eval_loglikelihood.py --preset small --items 2000 --batch-size 64     # GPU
    python benchmarks/eval_loglikelihood.py --device cpu --preset tiny --items 40 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from dsv3.config import load_model_config
from dsv3.data.tokenizer import train_tokenizer
from dsv3.eval.backends import load_checkpoint, load_transformers
from dsv3.eval.data import load_dataset
from dsv3.eval.lm import LoglikelihoodRequest
from dsv3.eval.metrics import choice_predictions
from dsv3.eval.tasks import TASKS
from dsv3.model import Transformer
from dsv3.model.hf import save_hf


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--items", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--systems", default="dsv3,dsv3-hf,lm-eval")
    return p.parse_args()


def _causal(lm):
    return lambda requests: [r.logprob for r in lm.loglikelihood(requests)]


def _lm_eval_scorer(directory: Path, device: str, dtype: torch.dtype, batch_size: int):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    hflm = HFLM(pretrained=str(directory), device=device, dtype=dtype, batch_size=batch_size)

    def score(requests: list[LoglikelihoodRequest]) -> list[float]:
        instances = [
            Instance("loglikelihood", {}, (r.context, r.continuation), i) for i, r in enumerate(requests)
        ]
        return [logprob for logprob, _ in hflm.loglikelihood(instances, disable_tqdm=True)]

    return score


def main() -> None:
    args = _parse()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    rows = load_dataset("hellaswag", "validation")[: args.items]
    items = TASKS["hellaswag"].build(rows, 0, None, None)
    requests = [LoglikelihoodRequest(i.context, c) for i in items for c in i.choices]
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "model"
        cfg = load_model_config(args.preset).model_copy(update={"num_nextn_predict_layers": 0})
        save_hf(Transformer(cfg, seed=0), directory, dtype=dtype)
        texts = [r.context + r.continuation for r in requests]
        train_tokenizer(texts, min(cfg.vocab_size, 4096), directory)
        batching = dict(batch_size=args.batch_size, batch_tokens=args.batch_size * 512)
        scorers = {
            "dsv3": lambda: _causal(load_checkpoint(directory, device=args.device, dtype=dtype, **batching)),
            "dsv3-hf": lambda: _causal(
                load_transformers(directory, device=args.device, dtype=dtype, **batching)
            ),
            "lm-eval": lambda: _lm_eval_scorer(directory, args.device, dtype, args.batch_size),
        }
        for name in args.systems.split(","):
            score = scorers[name]()
            score(requests[: 4 * args.batch_size])  # warm-up
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            logprobs = score(requests)
            if args.device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            it = iter(logprobs)
            correct = [
                choice_predictions([next(it) for _ in i.choices], i.choices)[1] == i.gold for i in items
            ]
            print(
                json.dumps(
                    {
                        "system": name,
                        "preset": args.preset,
                        "device": args.device,
                        "items": len(items),
                        "requests": len(requests),
                        "seconds": round(seconds, 3),
                        "requests_per_s": round(len(requests) / seconds, 1),
                        "acc_norm": sum(correct) / len(correct),
                    }
                ),
                flush=True,
            )
            del score


if __name__ == "__main__":
    main()
