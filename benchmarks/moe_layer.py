"""One MoE layer at decode sizes (how its time grows with the tokens a forward carries), or, with
`--train`, at a training batch (forward + backward and what it holds between them).

A speculative step verifies two tokens a row where a plain decode step feeds one, and at batch 1 a
MoE layer is most of a step's kernels. This times one MoE layer of a preset (router, routed and
shared experts) as the serving engine runs it: forward without gradients, through torch.compile with
dynamic shapes (`dsv3.infer.compiled.compile_dynamic`) and, on a GPU, inside a CUDA graph of 20 calls
replayed back to back, so the figure is the layer's device time with launches amortised. Paths:
`indexed` (the engine's, for up to `indexed_expert_tokens` tokens: each (token, slot) pair reads its
expert's weights by index) and `grouped` (sorted into expert order, grouped GEMMs: what longer
forwards use). One JSON line per (path, tokens): microseconds a layer.

`--train`: one MoE layer's forward and backward as a compiled training block runs it (bf16 weights
on a GPU, routed experts through grouped GEMMs, the combine weights inside SwiGLU): the median
milliseconds a forward + backward, and the memory the forward leaves for the backward (its saved
activations), for `--tokens` tokens (a batch of 8 rows).

    python benchmarks/moe_layer.py                      # a GPU: small, 1 and 2 tokens, both paths
    python benchmarks/moe_layer.py --train --tokens 16384     # a GPU: small's 8 x 2048 training batch
    python benchmarks/moe_layer.py --device cpu --preset tiny --iters 5      # a check of the script
    python benchmarks/moe_layer.py --device cpu --preset tiny --train --tokens 256 --iters 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dsv3.config import load_model_config
from dsv3.infer.compiled import compile_dynamic
from dsv3.model import Transformer
from dsv3.model.moe import indexed_expert_tokens

CALLS = 20  # calls a replay (one CUDA graph) or a timed iteration


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", default="1,2", help="comma-separated tokens a forward (a batch of one row)")
    p.add_argument("--paths", default="indexed,grouped")
    p.add_argument("--iters", type=int, default=50, help="timed replays, after 5 untimed")
    p.add_argument("--train", action="store_true", help="forward + backward at a training batch")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = load_model_config(args.preset)
    first_moe = next(i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i))
    cfg = cfg.model_copy(update={"num_hidden_layers": first_moe + 1, "num_nextn_predict_layers": 0})
    moe = Transformer(cfg, seed=0).to(device, dtype).eval().model.layers[first_moe].mlp
    if args.train:
        for tokens in (int(t) for t in args.tokens.split(",")):
            print(json.dumps({"preset": args.preset, "device": str(device), "mode": "train", "tokens": tokens,
                              **_train(moe, tokens, args.iters)}), flush=True)  # fmt: skip
        return
    indexed = indexed_expert_tokens(cfg)
    for path in args.paths.split(","):
        moe.indexed_tokens = indexed if path == "indexed" else 0
        layer = compile_dynamic(lambda x: moe(x)[0])  # a new compile per path: no stale specialisation
        for tokens in (int(t) for t in args.tokens.split(",")):
            if path == "indexed" and tokens > indexed:
                print(json.dumps({"path": path, "tokens": tokens, "skipped": f"more than {indexed} tokens"}))
                continue
            x = torch.randn(1, tokens, cfg.hidden_size, device=device, dtype=dtype)
            us = _time(layer, x, args.iters)
            print(json.dumps({"preset": args.preset, "device": str(device), "path": path, "tokens": tokens,
                              "us_per_layer": round(us, 2)}), flush=True)  # fmt: skip


def _train(moe: torch.nn.Module, tokens: int, iters: int) -> dict:
    """Median ms of a compiled forward + backward of `moe` over `tokens` tokens (8 rows), and the bytes
    its forward leaves allocated for the backward (GPU)."""
    rows = 8 if tokens % 8 == 0 else 1
    p = next(moe.parameters())
    x = torch.randn(rows, tokens // rows, p.shape[-1], device=p.device, dtype=p.dtype, requires_grad=True)
    grad = torch.randn_like(x)
    layer = torch.compile(lambda x: moe(x)[0])

    def step() -> None:
        moe.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(grad)

    for _ in range(3):
        step()
    times = []
    for _ in range(iters):
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    result = {"ms_median": round(1e3 * statistics.median(times), 3), "ms_min": round(1e3 * min(times), 3)}
    if x.is_cuda:
        moe.zero_grad(set_to_none=True)
        x.grad = None
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        y = layer(x)
        result["held_for_backward_mb"] = round((torch.cuda.memory_allocated() - before - y.nbytes) / 1e6, 1)
        y.backward(grad)
    return result


@torch.no_grad()
def _time(layer, x: torch.Tensor, iters: int) -> float:
    """Microseconds a call: CALLS calls a replay of one CUDA graph on a GPU, a loop elsewhere."""
    for _ in range(3):
        layer(x)
    if x.is_cuda:
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(CALLS):
                layer(x)
        run = graph.replay
    else:

        def run() -> None:
            for _ in range(CALLS):
                layer(x)

    for _ in range(5):
        run()
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        run()
    if x.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / (iters * CALLS) * 1e6


if __name__ == "__main__":
    main()
