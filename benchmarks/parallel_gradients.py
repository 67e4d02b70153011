"""The torchrun worker of `benchmarks/distributed.py gradients`: one step's gradients of a layout
against the same model in one process (`dsv3.train.gradient_check`), on the run's devices.

    torchrun --nproc-per-node 2 benchmarks/parallel_gradients.py --config OUT/ep-allgather-grad/run.yaml

Rank 0 prints one JSON line: the largest relative error (max |difference| / max |reference| of a
parameter's gradient) over all parameters, over the routed experts' and over the rest, with the
worst parameters' names. In float32 (`train.dtype=float32`) layouts differ from one process only in
the order of sums (the CPU tests hold them to 1e-5); bf16 rounds both sides differently (~1e-2).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch.distributed as dist

from dsv3.config import load_run_config
from dsv3.train.gradient_check import gradient_errors
from dsv3.train.trainer import Trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True)
    args = p.parse_args()
    cfg = load_run_config(args.config)
    errors = gradient_errors(Trainer(cfg))
    if dist.get_rank() == 0:
        experts = {n: e for n, e in errors.items() if ".experts." in n}
        rest = {n: e for n, e in errors.items() if n not in experts}
        worst = sorted(errors.items(), key=lambda kv: -kv[1])[:5]
        print(json.dumps({
            "config": str(args.config), "layout": cfg.parallel.model_dump(exclude_defaults=True),
            "dtype": cfg.train.dtype, "compile": cfg.train.compile, "parameters": len(errors),
            "max_error": max(errors.values()),
            "max_error_routed_experts": max(experts.values(), default=None),
            "max_error_rest": max(rest.values(), default=None),
            "worst": {n: round(e, 8) for n, e in worst},
        }), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
