"""What one compiled training forward keeps for its backward, per token, in any parallel layout.

The memory estimate (`dsv3.scaling.memory`) models activations per token; `benchmarks/saved_activations.py`
checks that model eagerly in one process. This runs the trainer's own model setup (`dsv3.parallel.
parallelize`: the layout's FSDP, expert parallelism, compile) under torchrun and reports on rank 0:
the device memory one forward leaves allocated (`held_after_forward`, what the backward will free; a
GPU only) and the bytes of the distinct storages autograd saved (`saved`), both per token, with the
largest saved storages by the shape they were first saved under. Weights and their transposes are
left out (they do not grow with tokens).

    torchrun --nproc-per-node 1 benchmarks/held_activations.py --batch 16 --seq 2048
    torchrun --nproc-per-node 2 benchmarks/held_activations.py --batch 16 --seq 2048 \\
        parallel.gpus=2 parallel.dp_shard=2 parallel.ep=2 parallel.ep_dispatch=all_gather
    torchrun --nproc-per-node 2 benchmarks/held_activations.py --device cpu --seq 384 \\
        model.num_hidden_layers=3 parallel.gpus=2 parallel.dp_shard=2 parallel.ep=2   # gloo ranks
"""

from __future__ import annotations

import argparse
import collections
import json
from contextlib import nullcontext

import torch
import torch.distributed as dist

from dsv3.config import load_run_config
from dsv3.parallel import build_meshes, init_distributed, parallelize
from saved_activations import saved_storages, weight_shapes  # this directory's


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="config overrides (KEY=VALUE) on the `small` preset")
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    B, T, dev = args.batch, args.seq, args.device
    run = [f"train.seq_len={T}", f"train.micro_batch_size={B}", "train.compile=true", f"train.device={dev}"]
    cfg = load_run_config(args.preset, [*run, *args.overrides])
    device = init_distributed(dev)
    model = parallelize(cfg, build_meshes(cfg.parallel, dev), device, torch.bfloat16, 1).parts
    weights = weight_shapes(model)
    cuda = device.type == "cuda"

    def step(count: bool) -> tuple[dict[int, tuple[int, tuple[int, ...], str]], int]:
        ids = torch.randint(0, cfg.model.vocab_size, (B, T + 1), device=device)
        before = torch.cuda.memory_allocated() if cuda else 0
        with torch.autocast(device.type, torch.bfloat16), (
                saved_storages(weights) if count else nullcontext({})) as saved:
            out = model.forward_with_losses(ids[:, :-1], ids[:, 1:], mtp_lambda=cfg.train.mtp_lambda,
                                            balance_alpha=0.0, return_logits=False)
        held = (torch.cuda.memory_allocated() - before) if cuda else 0
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        return saved, held

    for _ in range(2):  # compile and warm up
        step(False)
    saved, held = step(True)
    if dist.get_rank() == 0:
        tokens = B * T
        largest: collections.Counter = collections.Counter()
        for nbytes, shape, dtype in saved.values():
            largest[f"{shape} {dtype}"] += nbytes
        print(json.dumps({
            "preset": args.preset, "device": dev, "ranks": dist.get_world_size(), "batch": B, "seq": T,
            "overrides": args.overrides,
            "held_after_forward_bytes_per_token": round(held / tokens) if cuda else None,
            "saved_bytes_per_token": round(sum(v[0] for v in saved.values()) / tokens),
            "largest_saved_bytes_per_token": {k: round(v / tokens) for k, v in largest.most_common(12)},
        }), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
