"""How fast the GPUs of one machine talk: NCCL collectives timed at the sizes training moves.

Expert and data parallelism are bounded by this link, so a weak-scaling figure means little without it.
For each collective and buffer size it prints the time and the bus bandwidth in the convention of
nccl-tests (all_gather / reduce_scatter / all_to_all: algbw·(n−1)/n; all_reduce: algbw·2(n−1)/n, where
algbw = the buffer's bytes per rank / time; the buffer is all_gather's output, reduce_scatter's
input), and whether CUDA reports peer access between the GPUs (without it NCCL goes through host
memory).

    torchrun --nproc-per-node 2 benchmarks/collectives.py            # one JSON line per (op, size)
    torchrun --nproc-per-node 2 benchmarks/collectives.py --device cpu --sizes-mb 1,8   # gloo, a check
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist


def _op(name: str, n: int, numel: int, device: torch.device):
    """A call of collective `name` on a buffer of `numel` bf16 values per rank (all_gather's output,
    reduce_scatter's input, as nccl-tests sizes them), and its bus factor."""
    x = torch.randn(numel, device=device).bfloat16()
    piece = x.new_empty(numel // n)
    out = torch.empty_like(x)
    calls = {
        "all_gather": (lambda: dist.all_gather_into_tensor(out, piece), (n - 1) / n),
        "reduce_scatter": (lambda: dist.reduce_scatter_tensor(piece, x), (n - 1) / n),
        "all_to_all": (lambda: dist.all_to_all_single(out, x), (n - 1) / n),
        "all_reduce": (lambda: dist.all_reduce(out), 2 * (n - 1) / n),
    }
    return calls[name]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--sizes-mb", default="1,8,32,128", help="buffer sizes per rank, MB")
    p.add_argument("--ops", default="all_gather,reduce_scatter,all_to_all,all_reduce")
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if rank == 0:
        peers = ([torch.cuda.can_device_access_peer(0, j) for j in range(1, torch.cuda.device_count())]
                 if cuda else [])
        print(json.dumps({"bench": "collectives", "ranks": n, "device": args.device,
                          "peer_access_from_gpu0": peers}), flush=True)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for name in args.ops.split(","):
        for mb in (float(s) for s in args.sizes_mb.split(",")):
            numel = int(mb * 2**20) // 2 // n * n  # bf16 values, divisible by the ranks
            call, factor = _op(name, n, numel, device)
            for _ in range(3):
                call()
            sync()
            dist.barrier()
            start = time.perf_counter()
            for _ in range(args.iters):
                call()
            sync()
            seconds = (time.perf_counter() - start) / args.iters
            if rank == 0:
                algbw = numel * 2 / seconds / 1e9
                print(json.dumps({"op": name, "mb_per_rank": mb, "ms": round(seconds * 1e3, 3),
                                  "algbw_gb_s": round(algbw, 2), "busbw_gb_s": round(algbw * factor, 2)}),
                      flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
