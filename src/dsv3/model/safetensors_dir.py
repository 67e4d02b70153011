"""A model directory of safetensors shards, written atomically: config.json, shards, index.

Shards are cut at a byte budget and named as transformers names them; the directory is built
under a temp name and renamed into place (`dsv3.io.atomic_dir`), so a crash never leaves half a
checkpoint under the final name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsv3.checkpoints import CheckpointError
from dsv3.io import atomic_dir

__all__ = ["SINGLE_FILE", "INDEX_FILE", "parse_size", "write_safetensors_dir"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def parse_size(value: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a byte count → bytes."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(value), re.IGNORECASE)
    if not m:
        raise CheckpointError(f"size {value!r}: expected e.g. 5GB, 500MB, 2GiB or a byte count")
    unit = (m.group(2) or "B").upper()
    power = "BKMGT".index(unit[0])
    return int(float(m.group(1)) * (1024 if "I" in unit else 1000) ** power)


def write_safetensors_dir(
    tensors: Iterable[tuple[str, torch.Tensor]],
    path: Path,
    config: dict,
    max_shard_bytes: int,
    overwrite: bool,
    extra_files: Iterable[Path] = (),
) -> None:
    """Write config.json, safetensors shards and `extra_files` into `path` through `dsv3.io.atomic_dir`."""
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path}: already exists (pass overwrite to replace it)")
    with atomic_dir(path, overwrite=True) as tmp:
        shards: list[dict[str, torch.Tensor]] = [{}]
        sizes = [0]
        ptrs: list[set[int]] = [set()]
        files: list[str] = []

        def flush() -> None:
            files.append(f"shard-{len(files):05d}.part")
            save_file(shards[-1], str(tmp / files[-1]), metadata={"format": "pt"})
            shards[-1] = {}

        for name, t in tensors:
            t = t.detach().to("cpu").contiguous()
            nbytes = t.numel() * t.element_size()
            if shards[-1] and sizes[-1] + nbytes > max_shard_bytes:
                flush()
                sizes.append(0)
                ptrs.append(set())
            # safetensors refuses tensors that share storage: copy views (expert slices) and repeats.
            storage = t.untyped_storage()
            if storage.nbytes() != nbytes or storage.data_ptr() in ptrs[-1]:
                t = t.clone()
            ptrs[-1].add(t.untyped_storage().data_ptr())
            shards[-1][name] = t
            sizes[-1] += nbytes
        flush()
        weight_map = {}
        names = (
            [SINGLE_FILE]
            if len(files) == 1
            else [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
        )
        for old, new in zip(files, names, strict=True):
            os.replace(tmp / old, tmp / new)  # named once the total count is known
            with safe_open(tmp / new, framework="pt") as f:
                weight_map.update({k: new for k in f.keys()})  # noqa: SIM118
        if len(names) > 1:
            index = {"metadata": {"total_size": sum(sizes)}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for file in extra_files:
            shutil.copyfile(file, tmp / file.name)
