"""Bytes autograd keeps per token for one eager training forward, against the memory estimate's model.

`dsv3.scaling.memory` lists the tensors a block's backward needs (the activation model `dsv3 plan` and
`select-config` use). This counts what the eager model really keeps: every tensor saved for the
backward during one `forward_with_losses` under bf16 autocast (main head, MTP, balance loss), each
storage once, leaving out weights and their bf16 copies (they do not grow with tokens). Run at two
sequence lengths, the per-token figure shows what grows faster than linearly (attention that keeps
its scores: the CPU's kernels do; a GPU's flash or cuDNN attention keeps only the output and its
log-sum-exp).

    python benchmarks/saved_activations.py --preset small --seq 192 384     # CPU, a minute

Prints one JSON line per sequence length.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from dsv3.config import load_model_config
from dsv3.model import Transformer
from dsv3.scaling.memory import memory_profile


def weight_shapes(model: torch.nn.Module) -> set[tuple[int, ...]]:
    """Every parameter's shape (a sharded one's global and local shape) and its transpose (`.mT`, which
    GEMMs save for the backward): saved tensors of these shapes are weights, not activations."""
    shapes: set[tuple[int, ...]] = set()
    for p in model.parameters():
        for s in {tuple(p.shape), tuple(p.to_local().shape) if hasattr(p, "to_local") else tuple(p.shape)}:
            shapes |= {s, (*s[:-2], s[-1], s[-2])} if len(s) >= 2 else {s}
    return shapes


@contextmanager
def saved_storages(weights: set[tuple[int, ...]]) -> Iterator[dict[int, tuple[int, tuple[int, ...], str]]]:
    """Inside the block, every distinct storage autograd saves that is not a weight's: its address →
    (bytes, the shape and dtype it was first saved under)."""
    storages: dict[int, tuple[int, tuple[int, ...], str]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if tuple(t.shape) not in weights and t.layout == torch.strided:
            storage = t.untyped_storage()
            storages.setdefault(storage.data_ptr(), (storage.nbytes(), tuple(t.shape), str(t.dtype)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield storages


def saved_bytes(model: Transformer, ids: torch.Tensor, device: torch.device) -> int:
    """Bytes of the distinct storages autograd saves for one training forward of `ids` (1, T + 1)."""
    with torch.autocast(device.type, torch.bfloat16), saved_storages(weight_shapes(model)) as storages:
        model.forward_with_losses(ids[:, :-1], ids[:, 1:], mtp_lambda=0.3, balance_alpha=1e-4,
                                  return_logits=False)
    return sum(nbytes for nbytes, _, _ in storages.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--seq", type=int, nargs="+", default=[192, 384],
                   help="lengths unlike any weight dimension (a (T, d) activation must not pass for one)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    cfg = load_model_config(args.preset)
    model = Transformer(cfg, seed=0).to(device)
    profile = memory_profile(cfg)
    modelled = sum(a.split + a.replicated for a in [*profile.acts, profile.head_act])  # tp = 1
    for T in args.seq:
        ids = torch.randint(0, cfg.vocab_size, (1, T + 1), device=device)
        per_token = saved_bytes(model, ids, device) / T
        print(json.dumps({"preset": args.preset, "device": str(device), "seq": T,
                          "saved_bytes_per_token": round(per_token), "estimate_bytes_per_token": modelled,
                          "ratio": round(per_token / modelled, 3)}), flush=True)


if __name__ == "__main__":
    main()
