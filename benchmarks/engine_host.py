"""The engine's host time per step: scheduling, inputs, sampling rows, stop rules, outputs.

The model's forward is replaced by zeros, so what is timed is the Python around it (and the head
and sampler on a small vocabulary): the work async scheduling must hide behind the GPU's step.
For N running sequences, steps are timed at three points of their outputs' growth, with every
request streamed (an output snapshot per step) and final-only (`add_request(final_only=True)`).
With --speculative the engine drafts with an MTP module (also replaced by zeros): every greedy row
then verifies its draft in the fused speculative step and, the zero logits' argmax being the zero
draft, keeps it, so each step yields two tokens a row (100 % acceptance).

    python benchmarks/engine_host.py --rows 256 [--gc-freeze]       # CPU, 15 s
    python benchmarks/engine_host.py --rows 1 --points 50 --steps 400 [--speculative]

Prints one JSON line per (outputs, point).
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from dsv3.config import load_model_config
from dsv3.infer.engine import EngineConfig, LLMEngine
from dsv3.infer.sampling import SamplingParams
from dsv3.model import Transformer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=256, help="running sequences")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--points", default="50,350,1550", help="output lengths at which steps are timed")
    p.add_argument("--steps", type=int, default=100, help="steps timed at each point")
    p.add_argument("--speculative", action="store_true", help="one MTP draft a step (speculative_tokens=1)")
    p.add_argument("--gc-freeze", action="store_true",
                   help="freeze what start-up made out of the collector's reach, as `dsv3 serve` does")
    args = p.parse_args()
    torch.set_num_threads(1)
    points = [int(x) for x in args.points.split(",")]
    max_len = args.prompt_len + max(points) + args.steps * (1 + args.speculative) + 8  # tokens a step
    cfg = load_model_config("tiny").model_copy(
        update={"num_nextn_predict_layers": int(args.speculative), "num_hidden_layers": 1,
                "first_k_dense_replace": 1, "vocab_size": 256, "max_position_embeddings": max_len}
    )  # fmt: skip
    model = Transformer(cfg, seed=0).eval()
    for final_only in (False, True):
        config = EngineConfig(max_num_seqs=args.rows, max_model_len=max_len, async_scheduling=True,
                              num_blocks=args.rows * -(-max_len // 64) + 8,
                              speculative_tokens=int(args.speculative))  # fmt: skip
        engine = LLMEngine(model, None, config)
        d = cfg.hidden_size
        engine.runner._hidden_states = lambda ids, positions, batch, run_block=None, d=d: torch.zeros(
            *ids.shape, d)
        engine.runner._mtp_states = lambda h, ids, positions, batch, d=d: torch.zeros(*ids.shape, d)
        if args.gc_freeze:
            gc.collect()
            gc.freeze()
        params = SamplingParams(max_tokens=max_len - args.prompt_len - 1, temperature=0, ignore_eos=True)
        for i in range(args.rows):
            prompt = [1 + (i + j) % 200 for j in range(args.prompt_len)]
            engine.add_request(str(i), prompt, params, final_only=final_only)
        for point in points:
            while len(engine.scheduler.running) < args.rows or engine.scheduler.running[0].num_output < point:
                engine.step()
            tokens = engine.stats.generation_tokens
            start = time.perf_counter()
            for _ in range(args.steps):
                engine.step()
            ms = (time.perf_counter() - start) / args.steps * 1e3
            per_step = (engine.stats.generation_tokens - tokens) / args.steps / args.rows
            print(json.dumps({"bench": "engine_host", "rows": args.rows, "final_only": final_only,
                              "speculative": args.speculative, "gc_freeze": args.gc_freeze,
                              "output_tokens": point, "host_ms_per_step": round(ms, 3),
                              "tokens_per_row_step": round(per_step, 2)}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
