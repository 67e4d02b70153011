"""The global gradient norm of parameters sharded over different meshes, and clipping to it."""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

__all__ = ["clip_grad_norm_"]


@torch.no_grad()
def clip_grad_norm_(
    params: list[nn.Parameter], max_norm: float, pp_group: dist.ProcessGroup | None = None, apply: bool = True
) -> torch.Tensor:
    """Scale the gradients so that their global 2-norm is at most `max_norm`; return that norm
    (`apply=False`: only the norm, for an optimizer that scales the gradients as it reads them).

    DTensor gradients are grouped by mesh and placement (dense weights on the FSDP mesh, experts on
    the expert mesh, TP weights on both): DTensor reduces each group's norm over its own mesh, the
    squares add up, and pipeline stages (disjoint parameters) add theirs over `pp_group`.
    """
    groups: dict[object, list[nn.Parameter]] = defaultdict(list)
    for p in params:
        if p.grad is not None:
            key = (p.grad.device_mesh, p.grad.placements) if isinstance(p.grad, DTensor) else None
            groups[key].append(p)
    squares = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], 2.0, foreach=True)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        squares.append(norm.float().square())
    total = torch.stack(squares).sum() if squares else torch.zeros(())
    if pp_group is not None:
        dist.all_reduce(total, group=pp_group)
    total = total.sqrt()
    for group in groups.values() if apply else ():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total, foreach=True)
    return total
