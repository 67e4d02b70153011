"""One step's gradients of a parallel layout against the same model in one process.

Every layout must compute the gradients one process computes (the same init per parameter name, the
same samples, only the order of float sums differs). The CPU tests hold each layout to that on gloo
ranks; `benchmarks/parallel_gradients.py` runs the same check on GPUs, where compiled kernels,
NCCL and the Triton fast paths replace the CPU's code.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from dsv3.model import Transformer
from dsv3.train.loader import build_data
from dsv3.train.step import micro_batch
from dsv3.train.trainer import Trainer

__all__ = ["full_gradient", "gradient_errors"]


def full_gradient(name: str, grad: torch.Tensor) -> torch.Tensor:
    """A gradient as one whole tensor on every rank (a sharded one gathered)."""
    if not isinstance(grad, DTensor):
        return grad
    try:
        return grad.full_tensor()
    except RuntimeError as e:
        raise RuntimeError(f"{name}: gathering its gradient {grad.placements} of {tuple(grad.shape)} "
                           f"(local {tuple(grad.to_local().shape)}): {e}") from e


def gradient_errors(trainer: Trainer) -> dict[str, float]:
    """One step's gradient of every parameter (this layout, all ranks) against the unsharded model's in
    one process on this rank's device and precision, as max |difference| / max |reference|; the
    trainer's data and state are left as found. Every rank gets every parameter's error."""
    cfg, tc = trainer.cfg, trainer.tc
    position = trainer.data.sampler.state_dict()
    share = trainer.data.next_share(tc.global_batch_size, trainer.steps.meshes.dp_rank, cfg.parallel.dp)
    trainer.steps.forward_backward(list(share.split(tc.micro_batch_size)))
    mine = {n: full_gradient(n, p.grad) for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.data.sampler.load_state_dict(position)

    # the independent check: no mesh, no dispatcher, not compiled
    reference = Transformer(cfg.model, seed=tc.seed).to(trainer.device)
    data = build_data(cfg.data, tc.seq_len, tc.seed)
    n_micro = tc.global_batch_size // tc.micro_batch_size
    for _ in range(n_micro):  # the single-process trainer's own micro-batch step
        micro_batch(reference, data.next_batch(tc.micro_batch_size).to(trainer.device), tc, n_micro,
                    trainer.autocast)
    full = dict(reference.named_parameters())
    errors = {n: ((g - full[n].grad).abs().max() / full[n].grad.abs().max()).item() for n, g in mine.items()}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, errors)  # pipeline stages hold different parameters
    merged: dict[str, float] = {}
    for part in everyone:
        for n, e in part.items():
            merged[n] = max(e, merged.get(n, 0.0))
    return merged
