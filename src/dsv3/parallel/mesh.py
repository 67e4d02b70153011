"""Joining torchrun's process group, and the run's device meshes built from `parallel:`.

Two views of one world, both unflattened from the same 1-D mesh (so DTensors on either compose):

    dense    (pp, dp_replicate, dp_shard, tp)        attention, dense FFNs, norms, embedding, head
    experts  (pp, dp_replicate, efsdp, ep, tp)       routed experts: dp_shard = efsdp × ep

Neighbouring ranks differ first in tp, then in ep, so the chattiest groups (tensor parallel, then
the expert all-to-all) stay inside a node. `dp` (dp_replicate × dp_shard, flattened) is every rank that
reads its own share of the batch; metrics are reduced over the world.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from dsv3.config import ConfigError, ParallelConfig

__all__ = ["Meshes", "world_size", "check_world_size", "init_distributed", "build_meshes"]

log = logging.getLogger(__name__)


def world_size() -> int:
    """Processes in this job (torchrun's WORLD_SIZE; 1 when launched without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_world_size(cfg: ParallelConfig, world: int) -> None:
    """A one-line error naming the keys when the launch and `parallel:` disagree."""
    product = cfg.dp_replicate * cfg.dp_shard * cfg.tp * cfg.pp
    if product == world:
        return
    degrees = ", ".join(f"{k}={getattr(cfg, k)}" for k in ("dp_replicate", "dp_shard", "tp", "pp"))
    where = f"parallel: dp_replicate*dp_shard*tp*pp = {product} ({degrees})"
    if world == 1:
        raise ConfigError(f"{where} needs {product} processes: launch with torchrun "
                          f"--nproc-per-node {product} -m dsv3 train ...")
    raise ConfigError(f"{where} but the job has WORLD_SIZE={world} processes: make them multiply to {world} "
                      f"(and set parallel.gpus={world})")


def init_distributed(device_type: str, timeout_s: float = 1800.0) -> torch.device:
    """Join the job's process group (NCCL for GPU tensors plus gloo for CPU ones; gloo on CPU) and
    return this rank's device. The timeout bounds how long a rank waits on a peer that stopped."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"  # gloo: the CPU collectives of checkpointing
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend, timeout=timedelta(seconds=timeout_s), device_id=device if device.type == "cuda" else None
        )
    log.debug("rank %d of %d on %s", dist.get_rank(), dist.get_world_size(), device)
    return device


@dataclass(frozen=True)
class Meshes:
    """The sub-meshes each plan uses; built once (`build_meshes`) so every process group exists up front."""

    cfg: ParallelConfig
    dense: DeviceMesh
    experts: DeviceMesh
    dp: DeviceMesh  # dp_replicate × dp_shard, flattened

    @cached_property
    def fsdp(self) -> DeviceMesh:
        """Where FSDP shards the dense weights: 1-D over dp_shard, or 2-D (replicate, shard) for HSDP."""
        if self.cfg.dp_replicate > 1:
            return self.dense["dp_replicate", "dp_shard"]
        return self.dense["dp_shard"]

    @cached_property
    def expert_fsdp(self) -> DeviceMesh:
        """Where FSDP shards the routed experts: the dp_shard ranks outside the expert-parallel group."""
        if self.cfg.dp_replicate > 1:
            return self.experts["dp_replicate", "efsdp"]
        return self.experts["efsdp"]

    @cached_property
    def ep(self) -> DeviceMesh:
        return self.experts["ep"]

    @cached_property
    def tp(self) -> DeviceMesh:
        return self.dense["tp"]

    @cached_property
    def pp(self) -> DeviceMesh:
        return self.dense["pp"]

    @property
    def dp_rank(self) -> int:
        return self.dp.get_local_rank()

    @property
    def pp_rank(self) -> int:
        return self.dense.get_local_rank("pp")

    @property
    def tp_rank(self) -> int:
        return self.dense.get_local_rank("tp")


def build_meshes(cfg: ParallelConfig, device_type: str) -> Meshes:
    """The dense and expert views of the world, and the flattened data-parallel mesh."""
    check_world_size(cfg, dist.get_world_size())
    world = init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("world",))
    dense = world._unflatten(
        0, (cfg.pp, cfg.dp_replicate, cfg.dp_shard, cfg.tp), ("pp", "dp_replicate", "dp_shard", "tp")
    )
    experts = world._unflatten(
        0, (cfg.pp, cfg.dp_replicate, cfg.dp_shard // cfg.ep, cfg.ep, cfg.tp),
        ("pp", "dp_replicate", "efsdp", "ep", "tp"),
    )
    dp = dense["dp_replicate", "dp_shard"]._flatten("dp")
    meshes = Meshes(cfg, dense, experts, dp)
    for name in ("fsdp", "expert_fsdp", "ep", "tp", "pp"):  # create every group now, on every rank
        getattr(meshes, name)
    return meshes
