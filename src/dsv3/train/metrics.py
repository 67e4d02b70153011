"""Numbers the trainer reports besides the loss: expert load statistics, routing collapse, peak memory."""

from __future__ import annotations

import math
import resource
from typing import Any

import torch

__all__ = [
    "COLLAPSE_IMBALANCE", "COLLAPSE_STEPS", "expert_load_stats", "CollapseMonitor", "peak_memory",
]

# A MoE layer counts as collapsed while its busiest expert gets more than twice the mean load, and the
# trainer warns once one has stayed so for this many steps in a row. The first steps of a run pass
# through a short collapse (docs/training.md): the stretch is long enough to let that one go by.
COLLAPSE_IMBALANCE = 2.0
COLLAPSE_STEPS = 100


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak GPU memory allocated (CUDA) and the process's peak resident set size, in GB."""
    out = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}  # Linux: KiB
    if device.type == "cuda":
        out["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return out


def expert_load_stats(loads: torch.Tensor, biases: torch.Tensor | None, ep: int = 1) -> dict[str, Any]:
    """Per MoE layer: tokens per expert, max/mean imbalance, normalised load entropy, bias values.

    `loads` is (layers, experts) of routed-token counts. The entropy of the load distribution is
    divided by log(experts): 1.0 is a perfectly even load, 0.0 all tokens on one expert.
    With expert parallelism (`ep` > 1; rank r holds experts [r·E/ep, (r+1)·E/ep)) also the busiest
    rank's rows over the mean rank's, averaged and maximal over the layers: every MoE layer waits
    for its busiest rank, so this is the factor by which the routed experts' time exceeds a balanced
    one (what a load-aware expert placement would win back).
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
    if ep > 1 and any(ran):
        per_rank = loads.view(loads.shape[0], ep, -1).sum(dim=2)
        rank_ratio = (per_rank.max(dim=1).values / per_rank.mean(dim=1).clamp_min(1e-9)).tolist()
        ran_ratio = [v for v, r in zip(rank_ratio, ran, strict=True) if r]
        out["ep_imbalance"] = sum(ran_ratio) / len(ran_ratio)
        out["ep_imbalance_max"] = max(ran_ratio)
    if biases is not None:
        out["expert_bias"] = biases.double().tolist()
    return out


class CollapseMonitor:
    """Follows each MoE layer's max/mean expert load step by step. A layer is collapsed while the value is
    above `threshold`; `update` returns a warning, once per run, when a layer has stayed collapsed for
    `min_steps` steps in a row. Steps may be sparse (every logged step): a stretch spans first..last."""

    def __init__(
        self, layer_names: list[str], max_imbalance: float | None = None,
        threshold: float = COLLAPSE_IMBALANCE, min_steps: int = COLLAPSE_STEPS,
    ) -> None:
        self.layer_names, self.max_imbalance = layer_names, max_imbalance  # E / top-k: all on k experts
        self.threshold, self.min_steps = threshold, min_steps
        self.since: list[int | None] = [None] * len(layer_names)  # first step of each open stretch
        self.ended: list[list[tuple[int, int]]] = [[] for _ in layer_names]
        self.last_step = 0
        self.warned_at: int | None = None

    def update(self, step: int, imbalance: list[float | None], gamma: float) -> str | None:
        """Take step `step`'s max/mean load per layer (None: the layer saw no token); return the warning
        text the first time a layer has stayed collapsed for `min_steps` steps, else None."""
        for i, value in enumerate(imbalance):
            if value is not None and value > self.threshold:
                self.since[i] = step if self.since[i] is None else self.since[i]
            elif self.since[i] is not None:
                self.ended[i].append((self.since[i], self.last_step))
                self.since[i] = None
        self.last_step = step
        stuck = [i for i, s in enumerate(self.since) if s is not None and step - s + 1 >= self.min_steps]
        if self.warned_at is not None or not stuck:
            return None
        self.warned_at = step
        worst = max(stuck, key=lambda i: imbalance[i])
        first = self.since[worst]
        others = f" and {len(stuck) - 1} more MoE layers" if len(stuck) > 1 else ""
        ceiling = "" if self.max_imbalance is None else (
            f" (at most {self.max_imbalance:.2f}: every token on the same experts)"
        )
        return (
            f"routing collapsed: {self.layer_names[worst]}{others} sent over {self.threshold:g}x the mean "
            f"load to one expert for {step - first + 1} steps in a row (steps {first}-{step}); "
            f"max/mean load is {imbalance[worst]:.2f}{ceiling}. The balancing bias moves {gamma:.3g} per "
            "step: raise train.bias_update_speed, see docs/training.md"
        )

    def stretches(self) -> list[list[tuple[int, int]]]:
        """Per layer, the (first, last) steps of every collapsed stretch of at least `min_steps` steps so
        far, an open one included."""
        out = []
        for ended, since in zip(self.ended, self.since, strict=True):
            spans = ended + ([(since, self.last_step)] if since is not None else [])
            out.append([(a, b) for a, b in spans if b - a + 1 >= self.min_steps])
        return out
