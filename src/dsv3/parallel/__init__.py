"""Distributed training on torch.distributed: one device mesh from `parallel:`, plans applied from outside.

    mesh.py         torchrun's process group; the dense and expert views of the world (DeviceMesh)
    parallelize.py  cut, TP, EP, activation checkpointing, compile, FSDP, then init: `parallelize`
    fsdp.py         apply_fsdp: FSDP2 per block or group of blocks, bf16 compute, fp32 master + reduction
    expert.py       apply_ep: experts split over ep ranks, tokens by all-to-all (`AllToAllDispatcher`)
    pipeline.py     stages cut from the block list; 1F1B, interleaved1F1B, ZBVZeroBubble, DualPipeV
    tensor.py       apply_tp: DTensor parallelize_module for attention heads and dense/shared FFNs
    grads.py        the global gradient norm over every mesh, and clipping to it

Which layouts run is decided in `dsv3.scaling.layout` (shared with the planner); the model itself
never sees a process group.
"""

from dsv3.parallel.expert import AllToAllDispatcher, apply_ep
from dsv3.parallel.fsdp import apply_fsdp
from dsv3.parallel.grads import clip_grad_norm_
from dsv3.parallel.mesh import Meshes, build_meshes, check_world_size, init_distributed, world_size
from dsv3.parallel.parallelize import ParallelModel, apply_ac, apply_compile, init_parameters, parallelize
from dsv3.parallel.pipeline import Stage, forward_only, split_stages
from dsv3.parallel.tensor import apply_tp

__all__ = [
    "AllToAllDispatcher",
    "Meshes",
    "ParallelModel",
    "Stage",
    "apply_ac",
    "apply_compile",
    "apply_ep",
    "apply_fsdp",
    "apply_tp",
    "build_meshes",
    "check_world_size",
    "clip_grad_norm_",
    "forward_only",
    "init_distributed",
    "init_parameters",
    "parallelize",
    "split_stages",
    "world_size",
]
