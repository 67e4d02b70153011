"""Sharded checkpoints of a distributed run: torch.distributed.checkpoint, resumable on any layout.

Layout of `<output_dir>/step_000123/`:
  config.json, tokenizer.json          as in a single-process checkpoint: the directory still names its
                                       model and generates (`dsv3.model.hf.load_hf` reads the shards)
  dcp/.metadata, dcp/__<rank>_0.distcp the model (`model.<name>`) and AdamW (`optim.state.<name>.*`,
                                       flattened), every tensor under its global shape
  trainer/state.json, run_config.json, rng.safetensors     as in a single-process checkpoint
  manifest.json                        size and sha256 of every file; written last, by rank 0

Every rank writes its own shards into rank 0's temp directory; rank 0 writes the manifest and renames
the directory once all shards are on disk. The keys are the whole model's parameter names, whatever
the layout, so DCP reshards on load: a checkpoint saved by 4 FSDP ranks resumes on 2 ranks with expert
parallelism, or in one process. A single-process (Hugging Face layout) checkpoint resumes on any
layout too (`load_full_checkpoint`).
"""

from __future__ import annotations

import logging
import warnings
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)

from dsv3.checkpoints import SHARDED_DIR, CheckpointError, read_trainer_state
from dsv3.config import RunConfig
from dsv3.io import write_json_atomic
from dsv3.model.hf import hf_config_json
from dsv3.model.sharded import MODEL_KEY
from dsv3.train import checkpoint as ckpt

__all__ = ["begin_sharded_save", "load_sharded_checkpoint", "load_full_checkpoint", "training_state"]

log = logging.getLogger(__name__)

OPTIM_KEY = "optim"
_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """This rank's shards of the weights and AdamW state, under the keys a sharded checkpoint holds."""
    model_state, optim_state = get_state_dict(model, optimizer, options=_FLAT)
    return {MODEL_KEY: model_state, OPTIM_KEY: optim_state}


def begin_sharded_save(
    output_dir: Path, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict,
    run_config: RunConfig, tokenizer: Path | None, group: dist.ProcessGroup, stager=None,
) -> tuple[Path, Path, Future | None]:
    """Start writing the checkpoint of `step` (every rank calls it): (final path, temp path, the write
    in flight when a `stager` (DCP's `AsyncStager`: the host copy the background write reads) is given,
    else None with every shard written). `publish_checkpoint` ends it."""
    rank = dist.get_rank(group)
    where = [None, None]
    if rank == 0:
        final, tmp = ckpt.fresh_temp(output_dir, step)
        (tmp / SHARDED_DIR).mkdir(parents=True)
        write_json_atomic(tmp / "config.json", hf_config_json(run_config.model, torch.float32), indent=2)
        ckpt.write_trainer_files(tmp, step, trainer_state, run_config, tokenizer, ckpt.capture_rng())
        where = [str(final), str(tmp)]
    dist.broadcast_object_list(where, group=group, group_src=0)
    final, tmp = Path(where[0]), Path(where[1])
    state = training_state(model, optimizer)
    target = str(tmp / SHARDED_DIR)
    if stager is not None:
        future = dcp.async_save(state, checkpoint_id=target, process_group=group, async_stager=stager)
        return final, tmp, future
    dcp.save(state, checkpoint_id=target, process_group=group)
    return final, tmp, None


def load_sharded_checkpoint(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, group: dist.ProcessGroup | None
) -> dict:
    """Load weights and optimizer state into this rank's (possibly sharded) `model`; `group` None: one
    process. Returns the trainer state (step, sampler...)."""
    directory = Path(directory)
    state = training_state(model, optimizer)
    try:
        with warnings.catch_warnings():  # one process loading on purpose: no "assuming the intent" warning
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=str(directory / SHARDED_DIR), process_group=group,
                     no_dist=group is None)
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{directory}/{SHARDED_DIR}: cannot load into this layout ({e})") from None
    set_state_dict(model, optimizer, model_state_dict=state[MODEL_KEY], optim_state_dict=state[OPTIM_KEY],
                   options=_FLAT)
    _restore_rng(directory)
    return read_trainer_state(directory)


def load_full_checkpoint(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, run_config: RunConfig
) -> dict:
    """Load a single-process (Hugging Face layout) checkpoint into a distributed `model` and optimizer:
    every rank reads the whole files and keeps its shards."""
    directory = Path(directory)
    full = ckpt.load_model(directory, run_config.model, "cpu").state_dict()
    mine = list(model.state_dict())
    set_model_state_dict(model, {k: full[k] for k in mine}, options=StateDictOptions(full_state_dict=True))
    try:
        moments = load_file(str(directory / ckpt.OPTIMIZER))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{directory}: unreadable trainer tensors: {e}") from None
    options = StateDictOptions(full_state_dict=True)
    optim_state = get_optimizer_state_dict(model, optimizer, options=options)  # {"state": {name: {...}}}
    for key, value in moments.items():  # `<parameter name>/<state key>`
        name, _, state_key = key.rpartition("/")
        if name in optim_state["state"]:
            optim_state["state"][name][state_key] = value
    set_optimizer_state_dict(model, optimizer, optim_state, options=options)
    _restore_rng(directory)
    return read_trainer_state(directory)


def _restore_rng(directory: Path) -> None:
    try:
        rng = load_file(str(directory / ckpt.RNG))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{directory}: unreadable trainer tensors: {e}") from None
    ckpt.restore_rng(rng, read_trainer_state(directory)["rng"])
