"""One training step, evaluation and the reported numbers across the ranks of a distributed run.

Every data-parallel rank runs its share of the global batch (`TrainData.next_share`); gradients are
averaged by FSDP (each rank's loss is the mean over its own micro-batches), and the numbers rank 0
reports are reduced over the world: the loss from the ranks holding the last pipeline stage, the
expert loads summed over every rank (so every rank applies the same bias update), the peak memory
as the largest of any rank.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from dsv3.config import RunConfig
from dsv3.model.transformer import cross_entropy
from dsv3.parallel import ParallelModel, clip_grad_norm_, forward_only
from dsv3.train.evaluate import router_entropy
from dsv3.train.metrics import peak_memory
from dsv3.train.step import micro_batch

__all__ = ["DistributedSteps"]


class DistributedSteps:
    """The collective parts of training one `ParallelModel` (every rank calls every method)."""

    def __init__(self, cfg: RunConfig, par: ParallelModel, device: torch.device,
                 autocast: AbstractContextManager) -> None:
        self.cfg, self.par, self.device, self.autocast = cfg, par, device, autocast
        p = cfg.parallel
        self.meshes = par.meshes
        self.pp_group = par.meshes.pp.get_group() if p.pp > 1 else None
        n_stages = p.pp * p.stages_per_rank
        self.holds_first = not par.pipelined or any(s == 0 for s, _ in par.stages)
        self.holds_last = not par.pipelined or any(s == n_stages - 1 for s, _ in par.stages)
        # The ranks whose loss counts: each data-parallel rank once (tp rank 0, holding the last stage).
        self.reports = self.holds_last and self.meshes.tp_rank == 0
        self.local_moe = par.local_moe()
        self.n_experts = cfg.model.n_routed_experts

    # --- a training step ---------------------------------------------------------------------
    def forward_backward(self, micro_batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Run this rank's micro-batches forward and backward: (loss parts (4,), load (n_moe, E)), local."""
        if self.par.pipelined:
            return self._pipeline(micro_batches)
        tc, model = self.cfg.train, self.par.parts
        n = len(micro_batches)
        parts = torch.zeros(4, device=self.device)
        load = self._zero_load()
        defer = isinstance(model, FSDPModule) and self.cfg.parallel.grad_sync == "last_micro_batch"
        for i, batch in enumerate(micro_batches):  # FSDP reduce-scatters the gradients after each one,
            if defer:  # or only after the last: until then they add up unsharded
                model.set_requires_gradient_sync(i == n - 1)
            parts += micro_batch(model, batch.to(self.device, non_blocking=True), tc, n, self.autocast)
            for index, moe in self.local_moe:
                load[index] += moe.tokens_per_expert
        return parts, load

    def _pipeline(self, micro_batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(micro_batches)
        batch = torch.cat(micro_batches).to(self.device, non_blocking=True)
        for _, stage in self.par.stages:
            stage.loads.clear()
        self.par.loss_parts.parts.clear()
        # contiguous: torch 2.11's schedules check each micro-batch's strides against the stages'
        # (a (B, T) slice of the (B, T + 1) windows has row stride T + 1 and was refused)
        inputs = (batch[:, :-1].contiguous(),) if self.holds_first else ()
        with self.autocast:
            self.par.schedule.step(*inputs, target=batch[:, 1:].contiguous())
        # The last n entries: a first step may begin with torch's shape-inference run (pipeline.py).
        recorded = self.par.loss_parts.parts[-n:]
        parts = torch.stack(recorded).mean(0) if recorded else torch.zeros(4, device=self.device)
        load = self._zero_load()
        index = {id(m): i for i, m in self.local_moe}
        for _, stage in self.par.stages:
            if stage.loads:
                for row, moe in zip(sum(stage.loads[-n:]), stage.moe_layers(), strict=True):
                    load[index[id(moe)]] += row
        return parts, load

    def _zero_load(self) -> torch.Tensor:
        return torch.zeros(len(self.par.moe_names), self.n_experts, dtype=torch.int64, device=self.device)

    def reduce(self, parts: torch.Tensor, load: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's mean loss parts over the data-parallel ranks, and the expert loads of every rank."""
        parts = parts * (1.0 / self.cfg.parallel.dp if self.reports else 0.0)
        dist.all_reduce(parts)
        dist.all_reduce(load)
        return parts, load // self.cfg.parallel.tp  # every tp rank routed the same tokens

    def clip(self, max_norm: float, apply: bool = True) -> torch.Tensor:
        return clip_grad_norm_(list(self.par.parts.parameters()), max_norm, self.pp_group, apply)

    @torch.no_grad()
    def update_bias(self, gamma: float, load: torch.Tensor, where: torch.Tensor | None = None) -> None:
        """Every rank moves its layers' bias by the same global load: the biases stay identical."""
        for index, moe in self.local_moe:
            moe.update_bias(gamma, load[index], where)

    @torch.no_grad()
    def biases(self) -> torch.Tensor:
        """Every MoE layer's routing bias (n_moe, E), wherever its stage lives."""
        out = torch.zeros(len(self.par.moe_names), self.n_experts, device=self.device)
        if self.meshes.dp_rank == 0 and self.meshes.tp_rank == 0:
            for index, moe in self.local_moe:
                out[index] = moe.gate.e_score_correction_bias
        dist.all_reduce(out)
        return out

    def peak_memory(self) -> dict[str, float]:
        """The largest peak of any rank."""
        mine = peak_memory(self.device)
        values = torch.tensor(list(mine.values()), device=self.device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return dict(zip(mine, values.tolist(), strict=True))

    # --- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def validation(self, batches: list[torch.Tensor], entropy: bool) -> tuple[float, list[float | None]]:
        """Mean next-token loss over `batches` and the router entropy per MoE layer, the batches spread
        round-robin over the data-parallel ranks (a rank short of a batch runs one that is not counted,
        so every rank makes the same collective calls)."""
        dp, rank = self.cfg.parallel.dp, self.meshes.dp_rank
        model = self.par.parts
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # Σ loss·labels, Σ labels
        moes = [m for _, m in self.local_moe]
        was_training = model.training
        model.eval()
        try:
            with router_entropy(moes) if entropy else nullcontext(None) as acc:
                for k in range(math.ceil(len(batches) / dp)):
                    j = k * dp + rank
                    counted = j < len(batches)
                    if acc is not None:
                        acc.paused = not counted
                    batch = batches[j if counted else 0].to(self.device)
                    loss = self._eval_loss(batch)
                    if counted and loss is not None and self.reports:
                        n = batch[:, 1:].numel()
                        totals += torch.stack([loss.double() * n, totals.new_tensor(float(n))])
        finally:
            model.train(was_training)
        dist.all_reduce(totals)
        values: list[float | None] = []
        if acc is not None:
            sums = torch.zeros(2, len(self.par.moe_names), dtype=torch.float64, device=self.device)
            if self.meshes.tp_rank == 0:
                for (index, _), s, c in zip(self.local_moe, acc.sums, acc.counts, strict=True):
                    sums[0, index], sums[1, index] = s, c
            dist.all_reduce(sums)
            seen, counts = sums.tolist()
            values = [s / c if c else None for s, c in zip(seen, counts, strict=True)]
        return (totals[0] / totals[1].clamp_min(1)).item(), values

    def _eval_loss(self, batch: torch.Tensor) -> torch.Tensor | None:
        ids, labels = batch[:, :-1], batch[:, 1:]
        with self.autocast:
            if not self.par.pipelined:
                return self.par.parts.forward_with_losses(ids, labels, return_logits=False).lm_loss
            out = forward_only(self.par.stages, self.cfg.parallel, self.pp_group, ids)
            return None if out is None else cross_entropy(out[0], labels)
