"""The weights of a sharded training checkpoint, read in one process without a process group.

A distributed run saves its model and optimizer with torch.distributed.checkpoint under `dcp/`, the
model's tensors under `model.<parameter name>` whatever the layout that wrote them. Generation,
evaluation and `dsv3 convert --to-hf` read them here one tensor at a time (DCP's `no_dist` load
assembles each from every rank's shard), so a sharded checkpoint serves like a Hugging Face one.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from dsv3.checkpoints import SHARDED_DIR, CheckpointError

__all__ = ["MODEL_KEY", "sharded_model_tensors", "read_sharded"]

MODEL_KEY = "model"  # the top-level key of the model's state dict in the saved {model, optim}


def sharded_model_tensors(directory: Path) -> dict[str, TensorStorageMetadata]:
    """Parameter name → (size, dtype) of every model tensor in a sharded checkpoint."""
    try:
        metadata = dcp.FileSystemReader(str(Path(directory) / SHARDED_DIR)).read_metadata()
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{directory}/{SHARDED_DIR}: unreadable checkpoint metadata ({e})") from None
    prefix = MODEL_KEY + "."
    return {k.removeprefix(prefix): m for k, m in metadata.state_dict_metadata.items()
            if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}


def read_sharded(directory: Path, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (parameter name, full CPU tensor) for each of `names`, one tensor in memory at a time."""
    directory = Path(directory)
    found = sharded_model_tensors(directory)
    for name in names:
        meta = found.get(name)
        if meta is None:
            raise CheckpointError(f"{directory}/{SHARDED_DIR}: no tensor {name}")
        tensor = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        try:
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.simplefilter("ignore", UserWarning)
                dcp.load({MODEL_KEY: {name: tensor}}, checkpoint_id=str(directory / SHARDED_DIR),
                         no_dist=True)
        except (OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{directory}/{SHARDED_DIR}: cannot read {name} ({e})") from None
        yield name, tensor
