"""Pipeline parallelism with torch.distributed.pipelining: stages cut from the model's block list.

The units of a pipeline are the decoder blocks followed by the MTP depths; `dsv3.scaling.layout` cuts
them into `pp × stages_per_rank` stages and places the stages on ranks (the V schedules put the first and
the last stage on rank 0). A `Stage` holds the model's own modules under the model's own parameter
names, so a checkpoint does not depend on where the cuts fell:

    stage 0        ids (B, T) → embed → blocks → (h, [mtp_emb], [aux])
    middle         (h, [mtp_emb], [aux]) → blocks → (h, [mtp_emb], [aux])
    last           … → blocks → norm → head, MTP depths → (logits, [mtp_logits], [aux])

MTP predicts token t+d from the embedding of token t+d: the first stage looks those embeddings up and
they travel with the hidden state (`mtp_emb` (B, T, D, d)), so the embedding table lives on one stage
only. `aux` (1,) carries the summed balance loss of the blocks so far. `pipeline_loss` turns the last
stage's outputs into the training loss, as `Transformer.forward_with_losses` does.

Newer torch infers the stages' input and output shapes by running each stage (and the loss) once at
the start of the first step: the per-step records (loss parts, expert loads) keep one entry per call,
and the step reads the last `n_microbatches` of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleInterleaved1F1B,
    ScheduleZBVZeroBubble,
)

from dsv3.config import ParallelConfig
from dsv3.model.moe import MoE
from dsv3.model.rope import rope_cos_sin, rope_inv_freq
from dsv3.model.transformer import IGNORE_INDEX, Transformer, cross_entropy, shift_left
from dsv3.scaling.layout import rank_stages, stage_units

__all__ = ["Stage", "LossParts", "pipeline_loss", "split_stages", "build_schedule", "forward_only"]

SCHEDULES = {
    "1F1B": Schedule1F1B,
    "interleaved1F1B": ScheduleInterleaved1F1B,
    "ZBVZeroBubble": ScheduleZBVZeroBubble,
    "DualPipeV": ScheduleDualPipeV,
}


class Stage(nn.Module):
    """Pipeline units [lo, hi) of a Transformer: decoder blocks, then MTP depths (module docstring)."""

    def __init__(self, model: Transformer, units: range, first: bool, last: bool, mtp: bool, balance: bool):
        super().__init__()
        cfg = model.config
        L = cfg.num_hidden_layers
        self.first, self.last, self.balance = first, last, balance
        self.mtp_on = mtp and cfg.num_nextn_predict_layers > 0
        self.n_mtp = cfg.num_nextn_predict_layers
        self.model = nn.ModuleDict({"layers": nn.ModuleDict({str(i): model.model.layers[i] for i in units
                                                             if i < L})})
        if first:
            self.model["embed_tokens"] = model.model.embed_tokens
        if last:
            self.model["norm"] = model.model.norm
            self.lm_head = model.lm_head
            self.mtp = model.mtp  # all depths: `layout_problems` keeps them on the last stage
        self.inv_freq, self.attention_factor = rope_inv_freq(cfg)
        self.loads: list[torch.Tensor] = []  # tokens per expert (n_moe, E) of each forward this step

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def _add(self, aux: torch.Tensor | None, a: torch.Tensor | None) -> torch.Tensor | None:
        return aux if a is None else a.reshape(1) if aux is None else aux + a.reshape(1)

    def forward(self, x: torch.Tensor, *carried: torch.Tensor) -> tuple[torch.Tensor, ...]:
        carried = list(carried)
        mtp_emb = carried.pop(0) if self.mtp_on and not self.first else None
        aux = carried.pop(0) if self.balance and not self.first else None
        if self.first:
            ids = x
            h = self.model.embed_tokens(ids)
            if self.mtp_on:  # (B, T, D, d): the embedding of token t+d for depth d
                mtp_emb = torch.stack(
                    [self.model.embed_tokens(shift_left(ids, d, 0)) for d in range(1, self.n_mtp + 1)], dim=2
                )
        else:
            h = x
        positions = torch.arange(h.shape[1], device=h.device)
        cos, sin = rope_cos_sin(self.inv_freq.to(h.device), positions, self.attention_factor)
        for block in self.model.layers.values():
            h, a = block(h, cos, sin, self.balance)
            aux = self._add(aux, a)
        outputs = [h]
        if self.last:
            h = self.model.norm(h)
            outputs = [self.lm_head(h)]
            if self.mtp_on:
                states = []
                for depth, layer in enumerate(self.mtp):
                    h, a = layer(h, mtp_emb[:, :, depth], cos, sin, self.balance)
                    aux = self._add(aux, a)
                    states.append(self.lm_head(h))
                outputs.append(torch.stack(states))  # (D, B, T, vocab)
        elif self.mtp_on:
            outputs.append(mtp_emb)
        if self.balance:  # a zero tied to h when no MoE block ran yet: every output is differentiable
            outputs.append(aux if aux is not None else (h.sum() * 0).reshape(1))
        if torch.is_grad_enabled():  # a training forward (a recomputation in backward does not come here)
            self._count_load()
        return tuple(outputs)

    @torch.no_grad()
    def _count_load(self) -> None:
        """Keep this forward's tokens per expert."""
        moes = self.moe_layers()
        if moes:
            self.loads.append(torch.stack([m.tokens_per_expert for m in moes]))


@dataclass
class LossParts:
    """Per micro-batch (loss, lm, mtp, balance), as the last stage's loss function computes them."""

    mtp_lambda: float
    balance_alpha: float
    parts: list[torch.Tensor] = field(default_factory=list)


def pipeline_loss(out: tuple[torch.Tensor, ...], labels: torch.Tensor, record: LossParts, mtp: bool,
                  balance: bool) -> torch.Tensor:
    """The last stage's outputs → lm + λ·mean MTP + α·balance, the sum forward_with_losses returns."""
    lm = cross_entropy(out[0], labels)
    zero = lm.new_zeros(())
    mtp_loss = bal = zero
    if mtp:
        per_depth = [cross_entropy(logits, shift_left(labels, d, IGNORE_INDEX)) for d, logits in
                     enumerate(out[1], start=1)]
        mtp_loss = record.mtp_lambda * torch.stack(per_depth).mean()
    if balance:
        bal = record.balance_alpha * out[-1].reshape(())
    loss = lm + mtp_loss + bal
    record.parts.append(torch.stack([loss, lm, mtp_loss, bal]).detach())
    return loss


def split_stages(model: Transformer, parallel: ParallelConfig, pp_rank: int, mtp: bool,
                 balance: bool) -> list[tuple[int, Stage]]:
    """(stage index, Stage) for each stage pp rank `pp_rank` holds, cut from `model` (often on meta)."""
    cfg = model.config
    n_stages = parallel.pp * parallel.stages_per_rank
    bounds = stage_units(cfg.num_hidden_layers + cfg.num_nextn_predict_layers, n_stages)
    return [(s, Stage(model, bounds[s], s == 0, s == n_stages - 1, mtp, balance))
            for s in rank_stages(pp_rank, parallel)]


class StageParts(nn.Module):
    """Every module of a rank's stages under the model's names: what the optimizer and checkpoints see."""

    def __init__(self, stages: list[Stage]) -> None:
        super().__init__()
        layers = {}
        self.model = nn.ModuleDict()
        for stage in stages:
            layers.update(stage.model.layers.items())
            for name in ("embed_tokens", "norm"):
                if name in stage.model:
                    self.model[name] = stage.model[name]
            if stage.last:
                self.lm_head, self.mtp = stage.lm_head, stage.mtp
        self.model["layers"] = nn.ModuleDict(sorted(layers.items(), key=lambda kv: int(kv[0])))

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]


def build_schedule(stages: list[tuple[int, Stage]], parallel: ParallelConfig, group: dist.ProcessGroup,
                   device: torch.device, n_micro: int, loss_fn: Callable):
    """torch's schedule for `parallel.pp_schedule` over this rank's stages."""
    n_stages = parallel.pp * parallel.stages_per_rank
    pipeline_stages = [PipelineStage(stage, index, n_stages, device, group=group) for index, stage in stages]
    cls = SCHEDULES[parallel.pp_schedule]
    if parallel.stages_per_rank == 1:
        return cls(pipeline_stages[0], n_microbatches=n_micro, loss_fn=loss_fn)
    return cls(pipeline_stages, n_microbatches=n_micro, loss_fn=loss_fn)


@torch.no_grad()
def forward_only(stages: list[tuple[int, Stage]], parallel: ParallelConfig, group: dist.ProcessGroup,
                 ids: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """One forward through the whole pipeline, stage after stage (evaluation: no schedule, no overlap).

    Every pp rank calls it with the same `ids`; the rank holding the last stage gets its outputs, the
    others None. Activations move with point-to-point sends, their shapes and dtypes sent first.
    """
    n_stages = parallel.pp * parallel.stages_per_rank
    mine = dict(stages)
    owner = {s: r for r in range(parallel.pp) for s in rank_stages(r, parallel)}
    me = dist.get_rank(group)
    carried: tuple[torch.Tensor, ...] = ()
    for s in range(n_stages):
        if s not in mine:
            continue
        if s > 0 and owner[s - 1] != me:
            carried = _recv(dist.get_global_rank(group, owner[s - 1]), ids.device)
        args = (ids,) if s == 0 else carried
        carried = mine[s](*args)
        if s < n_stages - 1 and owner[s + 1] != me:
            _send(carried, dist.get_global_rank(group, owner[s + 1]))
    return carried if n_stages - 1 in mine else None


def _send(tensors: tuple[torch.Tensor, ...], dst: int) -> None:
    dist.send_object_list([[(tuple(t.shape), t.dtype) for t in tensors]], dst=dst)
    for t in tensors:
        dist.send(t.contiguous(), dst=dst)


def _recv(src: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    meta = [None]
    dist.recv_object_list(meta, src=src)
    out = []
    for shape, dtype in meta[0]:
        t = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(t, src=src)
        out.append(t)
    return tuple(out)
