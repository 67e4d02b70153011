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

import torch

from dsv3.config import load_model_config
from dsv3.model import Transformer
from dsv3.scaling.memory import memory_profile


def saved_bytes(model: Transformer, ids: torch.Tensor, device: torch.device) -> int:
    """Bytes of the distinct storages autograd saves for one training forward of `ids` (1, T + 1)."""
    weights = {tuple(p.shape) for p in model.parameters()}
    # ... and their transposes (`.mT`), which GEMMs save for the backward
    weights |= {(*p.shape[:-2], p.shape[-1], p.shape[-2]) for p in model.parameters() if p.dim() >= 2}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if tuple(t.shape) not in weights and t.layout == torch.strided:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    saving = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with torch.autocast(device.type, torch.bfloat16), saving:
        model.forward_with_losses(ids[:, :-1], ids[:, 1:], mtp_lambda=0.3, balance_alpha=1e-4,
                                  return_logits=False)
    return sum(storages.values())


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
