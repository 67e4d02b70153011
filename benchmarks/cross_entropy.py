"""The training loss's output head: whole logits, dsv3's chunked loss, Liger's fused linear cross-entropy.

At a large vocabulary a head's logits (tokens × vocab), their float32 copy and its gradient are the
largest tensors of a step. dsv3 offers whole logits (the default) and `train.loss_chunk_tokens`
(`dsv3.model.linear_cross_entropy`: chunks of positions, each chunk's gradients made in its forward);
Liger-Kernel's `LigerFusedLinearCrossEntropyLoss` does the same with its own Triton kernels and chunk
sizes. This times each as the trainer runs it (float32 head weight and hidden states, bf16
autocast, compiled on a GPU) over one forward + backward, and prints one JSON line per (shape, method):
median milliseconds, peak memory above the inputs, and the loss and gradients against the whole
logits in float32 without autocast (the exact sum), then a line of ratios against `whole`.

    python benchmarks/cross_entropy.py            # a GPU: small's head (32k), DeepSeek-V3's vocabulary
    python benchmarks/cross_entropy.py --device cpu --shapes 256x64x1000 --iters 2   # a check of the script

Liger is measured where `liger_kernel` imports (a CUDA GPU: its kernels are Triton); elsewhere its
line says it was skipped and why.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.model.linear_cross_entropy import IGNORE_INDEX, chunk_loss_and_grad, linear_cross_entropy
from dsv3.model.transformer import cross_entropy

LossFn = Callable[[nn.Linear, torch.Tensor, torch.Tensor], torch.Tensor]


def _methods(device: torch.device, chunks: list[int]) -> dict[str, LossFn | str]:
    """name → loss(head, h (B, T, d), targets (B, T)), or why it is not run here."""
    gpu = device.type == "cuda"
    compiled = torch.compile if gpu else (lambda f: f)  # as `Transformer.compile_blocks` does on a GPU
    whole = compiled(lambda head, h, t: cross_entropy(head(h), t))
    chunk_fn = compiled(chunk_loss_and_grad)
    methods: dict[str, LossFn | str] = {"whole": whole}
    for n in chunks:
        methods[f"chunked_{n}"] = lambda head, h, t, n=n: linear_cross_entropy(h, head.weight, t, n, chunk_fn)
    methods["liger"] = _liger() if gpu else "Liger's kernels are Triton: CUDA only"
    return methods


def _liger() -> LossFn | str:
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as err:
        return f"liger-kernel does not import ({err}): pip install liger-kernel"
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX)
    return lambda head, h, t: loss(head.weight, h.flatten(0, 1), t.flatten())


def _inputs(tokens: int, hidden: int, vocab: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(hidden, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=g) * hidden**-0.5)
    h = torch.randn(1, tokens, hidden, generator=g)
    t = torch.randint(0, vocab, (1, tokens), generator=g)
    t[0, :: 17] = IGNORE_INDEX  # a few ignored positions, as padding and document ends make
    return head.to(device), h.to(device).requires_grad_(), t.to(device)


def _grads(fn: LossFn, head: nn.Linear, h: torch.Tensor, t: torch.Tensor, autocast: bool):
    head.weight.grad, h.grad = None, None
    with torch.autocast(h.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = fn(head, h, t)
    loss.backward()
    return loss.detach().float(), head.weight.grad.clone(), h.grad.clone()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference over the reference's largest entry."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30))


def measure(shape: tuple[int, int, int], device: torch.device, chunks: list[int], iters: int) -> list[dict]:
    tokens, hidden, vocab = shape
    head, h, t = _inputs(tokens, hidden, vocab, device)
    exact = lambda hd, x, y: cross_entropy(F.linear(x, hd.weight), y)  # noqa: E731  float32, no autocast
    ref_loss, ref_gw, ref_gh = _grads(exact, head, h, t, False)
    lines = []
    for name, fn in _methods(device, chunks).items():
        line: dict = {"bench": "cross_entropy", "tokens": tokens, "hidden": hidden, "vocab": vocab,
                      "method": name}
        if isinstance(fn, str):
            lines.append({**line, "skipped": fn})
            continue
        loss, gw, gh = _grads(fn, head, h, t, device.type == "cuda")  # warm-up (compiles) and the check
        line |= {"loss_rel_diff": float((loss - ref_loss).abs() / ref_loss.abs()),
                 "grad_weight_rel_diff": _rel(gw, ref_gw), "grad_hidden_rel_diff": _rel(gh, ref_gh)}
        del gw, gh
        head.weight.grad, h.grad = None, None
        times = []
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(iters):
            start = time.perf_counter()
            _grads(fn, head, h, t, device.type == "cuda")
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        line["ms"] = round(1e3 * statistics.median(times), 3)
        if device.type == "cuda":
            line["peak_gb_above_inputs"] = round((torch.cuda.max_memory_allocated(device) - base) / 1e9, 3)
        lines.append(line)
    return lines


def _ratios(lines: list[dict]) -> dict:
    by = {ln["method"]: ln for ln in lines if "ms" in ln}
    whole = by.get("whole")
    out = {"bench": "cross_entropy_ratios", "tokens": lines[0]["tokens"], "hidden": lines[0]["hidden"],
           "vocab": lines[0]["vocab"], "baseline": "whole"}
    for name, ln in by.items():
        if whole and name != "whole":
            out[f"{name}_speed_vs_whole"] = round(whole["ms"] / ln["ms"], 3)
            if "peak_gb_above_inputs" in ln:
                memory = ln["peak_gb_above_inputs"] / whole["peak_gb_above_inputs"]
                out[f"{name}_memory_vs_whole"] = round(memory, 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default="16384x1024x32768,16384x1024x129280,16384x2048x129280",
                   help="TOKENSxHIDDENxVOCAB, comma-separated (default: small's head at 8 x 2048, and "
                        "DeepSeek-V3's vocabulary at two widths)")
    p.add_argument("--chunks", default="2048,4096,8192", help="dsv3's chunk sizes (positions)")
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    device = torch.device(args.device)
    chunks = [int(c) for c in args.chunks.split(",") if c]
    for spec in args.shapes.split(","):
        shape = tuple(int(v) for v in spec.lower().split("x"))
        if len(shape) != 3:
            raise SystemExit(f"--shapes: {spec!r} is not TOKENSxHIDDENxVOCAB")
        lines = measure(shape, device, chunks, args.iters)  # type: ignore[arg-type]
        for line in lines:
            print(json.dumps(line), flush=True)
        print(json.dumps(_ratios(lines)), flush=True)


if __name__ == "__main__":
    main()
