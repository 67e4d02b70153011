"""dsv3 vs transformers' DeepseekV3ForCausalLM on the same weights, on the device the benchmarks use.

The CPU tests prove parity in fp32 on tiny shapes; this checks the paths only a GPU takes (fused
cuDNN/flash SDPA, grouped_mm experts and the bf16 router GEMM, bf16 parameters) at the benchmark's
own preset:

- fp32 logits, both systems: max abs difference (TF32 off);
- bf16 logits and bf16 gradients of each system against the fp32 transformers reference: dsv3's
  bf16 error should be of the same size as transformers' own bf16 error.

    python benchmarks/gpu_parity.py --preset small --batch 2 --seq 512        # one GPU
    python benchmarks/gpu_parity.py --device cpu --preset tiny --batch 1 --seq 32

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from dsv3.config import load_model_config
from dsv3.model import Transformer
from dsv3.model.hf import save_hf


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """‖a − ref‖ / ‖ref‖ in float64."""
    a, ref = a.double(), ref.double()
    return ((a - ref).norm() / ref.norm()).item()


def _logits_and_grad(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, hf: bool):
    """Logits (float32) and the gradient of the mean LM loss w.r.t. the embedding (float32)."""
    model.zero_grad(set_to_none=True)
    if hf:
        out = model(input_ids=ids, labels=labels, shift_labels=labels)
    else:
        out = model.forward_with_losses(ids, labels, mtp_lambda=0.0)
    out.loss.backward()
    embed = model.model.embed_tokens.weight  # the same name in both (HF layout)
    return out.logits.detach().float(), embed.grad.float(), out.loss.item()


def main() -> None:
    args = _parse()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    import transformers

    cfg = load_model_config(args.preset).model_copy(update={"num_nextn_predict_layers": 0})
    gen = torch.Generator().manual_seed(args.seed)
    data = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen).to(device)
    ids, labels = data[:, :-1].contiguous(), data[:, 1:].contiguous()

    ours = Transformer(cfg, seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(ours, Path(tmp) / "m", dtype=torch.float32)
        theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(Path(tmp) / "m", dtype=torch.float32)
    ours, theirs = ours.to(device).train(), theirs.to(device).train()

    results: dict = {"preset": args.preset, "batch": args.batch, "seq": args.seq, "device": str(device)}
    if device.type == "cuda":
        results["device"] = torch.cuda.get_device_name(device)
    ref_logits, ref_grad, ref_loss = _logits_and_grad(theirs, ids, labels, hf=True)
    our_logits, our_grad, our_loss = _logits_and_grad(ours, ids, labels, hf=False)
    results["fp32"] = {
        "logits_max_abs_diff": (our_logits - ref_logits).abs().max().item(),
        "logits_rel": _rel(our_logits, ref_logits),
        "embed_grad_rel": _rel(our_grad, ref_grad),
        "loss": {"dsv3": our_loss, "hf": ref_loss},
    }
    for name, model, hf in (("dsv3", ours, False), ("hf", theirs, True)):
        model.to(torch.bfloat16)
        logits, grad, loss = _logits_and_grad(model, ids, labels, hf)
        results[f"bf16_{name}_vs_fp32_hf"] = {
            "logits_rel": _rel(logits, ref_logits),
            "logits_max_abs_diff": (logits - ref_logits).abs().max().item(),
            "embed_grad_rel": _rel(grad, ref_grad),
            "loss": loss,
        }
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
