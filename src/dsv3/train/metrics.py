"""Numbers the trainer reports besides the loss: expert load statistics and peak memory."""

from __future__ import annotations

import math
import resource
from typing import Any

import torch

__all__ = ["expert_load_stats", "peak_memory"]


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak GPU memory allocated (CUDA) and the process's peak resident set size, in GB."""
    out = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}  # Linux: KiB
    if device.type == "cuda":
        out["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return out


def expert_load_stats(loads: torch.Tensor, biases: torch.Tensor | None) -> dict[str, Any]:
    """Per MoE layer: tokens per expert, max/mean imbalance, normalised load entropy, bias values.

    `loads` is (layers, experts) of routed-token counts. The entropy of the load distribution is
    divided by log(experts): 1.0 is a perfectly even load, 0.0 all tokens on one expert.
    """
    loads = loads.double()
    ran = (loads.sum(dim=1) > 0).tolist()  # MTP layers see no token when the MTP loss is off
    mean = loads.mean(dim=1).clamp_min(1e-9)
    frac = loads / loads.sum(dim=1, keepdim=True).clamp_min(1e-9)
    entropy = -(frac * frac.clamp_min(1e-12).log()).sum(dim=1) / math.log(loads.shape[1])
    imbalance = (loads.max(dim=1).values / mean).tolist()
    out: dict[str, Any] = {
        "expert_load": loads.long().tolist(),
        "imbalance": [v if r else None for v, r in zip(imbalance, ran, strict=True)],
        "load_entropy": [v if r else None for v, r in zip(entropy.tolist(), ran, strict=True)],
    }
    if any(ran):
        out["imbalance_max"] = max(v for v in out["imbalance"] if v is not None)
    if biases is not None:
        out["expert_bias"] = biases.double().tolist()
    return out
