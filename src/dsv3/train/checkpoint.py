"""Crash-safe training checkpoints: one directory per save, no pickle anywhere.

Layout of `<output_dir>/step_000123/`:
  config.json, model*.safetensors     the model in the Hugging Face DeepSeek-V3 layout (model.hf)
  tokenizer.json (+ transformers' tokenizer_config.json)  the run's tokenizer: the directory
                                      generates on its own
  trainer/optimizer.safetensors       AdamW moments, keyed `<parameter name>/<state key>`
  trainer/rng.safetensors             torch CPU/CUDA generator states
  trainer/state.json                  step, sampler, schedule, python/numpy RNG, metrics
  trainer/run_config.json             the RunConfig that produced it
  manifest.json                       size and sha256 of every file above; written last

Trainer files sit in a subfolder so the top level is exactly a Hugging Face model directory.

A save goes to a hidden temp directory, every file and the directory are fsynced, the manifest is
written, and only then is the directory renamed to `step_*`. A process killed mid-save leaves a
temp directory that discovery ignores, so the previous checkpoint stays the newest complete one.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dsv3.checkpoints import (
    FORMAT_VERSION,
    RUN_CONFIG,
    TRAINER_STATE,
    CheckpointError,
    best_checkpoint,
    checkpoint_name,
    list_checkpoints,
    read_trainer_state,
    resolve_checkpoint,
    verify_checkpoint,
    write_manifest,
)
from dsv3.config import ModelConfig, RunConfig
from dsv3.data.tokenizer import copy_tokenizer
from dsv3.io import publish_dir, remove_dir, sweep_temps, temp_path
from dsv3.model.hf import load_hf, read_hf_config, save_hf

__all__ = [
    "save_checkpoint",
    "write_trainer_files",
    "fresh_temp",
    "publish_checkpoint",
    "check_architecture",
    "capture_rng",
    "optimizer_tensors",
    "load_model",
    "restore_training_state",
    "resolve_resume",
    "prune_checkpoints",
    "model_differences",
    "remove_stale_temps",
]

log = logging.getLogger(__name__)

OPTIMIZER = "trainer/optimizer.safetensors"
RNG = "trainer/rng.safetensors"


def resolve_resume(resume: str | None, output_dir: Path) -> Path | None:
    """`auto` = the last complete checkpoint in output_dir (None when there is none); else the given
    checkpoint, or a run directory's last one. A resume needs trainer state: a bare model is refused."""
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = resolve_checkpoint(resume, "last")
    verify_checkpoint(path)  # raises for a model directory with no manifest (no trainer state)
    return path


def prune_checkpoints(output_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints and the one with the best validation loss."""
    ckpts = list_checkpoints(output_dir)
    keep = set(ckpts[-keep_last:])
    if (best := best_checkpoint(output_dir)) is not None:
        keep.add(best)
    removed = []
    for p in ckpts:
        if p not in keep:
            remove_dir(p)
            removed.append(p)
    return removed


def remove_stale_temps(output_dir: Path) -> None:
    """Clear what a save that was killed left in `output_dir` (its temp directory)."""
    for p in sweep_temps(output_dir):
        log.info("removed %s (left by an interrupted save)", p)


# --------------------------------------------------------------------------------------------
# State that is not the model: optimizer and RNG, as tensors + JSON
# --------------------------------------------------------------------------------------------


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]


def optimizer_tensors(
    model: nn.Module, optimizer: torch.optim.Optimizer, on_host: bool = True
) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state keyed by parameter name, so it survives reordering; copied to
    the host unless `on_host` is false (the caller then copies them, e.g. in the background)."""
    names = _param_names(model, optimizer)
    state = optimizer.state_dict()["state"]
    out = {}
    for idx, per_param in state.items():
        for key, value in per_param.items():
            value = value.detach()
            out[f"{names[idx]}/{key}"] = (value.cpu() if on_host else value).contiguous()
    return out


def load_optimizer_tensors(
    model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], source: Path
) -> None:
    names = _param_names(model, optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    by_name: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, state_key = key.rpartition("/")
        by_name.setdefault(name, {})[state_key] = value
    missing = [n for n in names if n not in by_name]
    extra = sorted(set(by_name) - set(names))
    if extra or (missing and len(missing) < len(names)):
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise CheckpointError(f"{source}: optimizer state does not match the model's parameters ({what})")
    sd = optimizer.state_dict()
    sd["state"] = {}
    for idx, (name, p) in enumerate(zip(names, params, strict=True)):
        if name not in by_name:
            continue  # no step taken yet when it was saved
        for state_key, t in by_name[name].items():
            if t.ndim and t.shape != p.shape:
                raise CheckpointError(
                    f"{source}: optimizer {name}/{state_key} has shape {tuple(t.shape)}, "
                    f"parameter has {tuple(p.shape)}"
                )
        sd["state"][idx] = by_name[name]
    optimizer.load_state_dict(sd)


def capture_rng() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    meta = {
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss, "cached": cached},
        "python": {"version": version, "state": list(py_state), "gauss_next": gauss_next},
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    n = meta["numpy"]
    keys = np.array(n["keys"], dtype=np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached"]))
    p = meta["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


# --------------------------------------------------------------------------------------------
# Save and load
# --------------------------------------------------------------------------------------------


def write_trainer_files(
    directory: Path, step: int, trainer_state: dict, run_config: RunConfig, tokenizer: Path | None,
    rng: tuple[dict[str, torch.Tensor], dict],
) -> None:
    """The files besides the tensors: trainer state (with the RNG), run config, tokenizer."""
    rng_tensors, rng_meta = rng
    (directory / RNG).parent.mkdir(parents=True, exist_ok=True)
    save_file(rng_tensors, str(directory / RNG))
    state = {**trainer_state, "step": step, "rng": rng_meta, "format_version": FORMAT_VERSION}
    (directory / TRAINER_STATE).write_text(json.dumps(state, indent=1, sort_keys=True), encoding="utf-8")
    (directory / RUN_CONFIG).write_text(run_config.model_dump_json(indent=1), encoding="utf-8")
    if tokenizer is not None:
        copy_tokenizer(Path(tokenizer), directory)


def fresh_temp(output_dir: Path, step: int) -> tuple[Path, Path]:
    """(final path, temp path, not yet created) for the checkpoint of `step`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / checkpoint_name(step)
    tmp = temp_path(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    return final, tmp


def publish_checkpoint(tmp: Path, final: Path, step: int) -> Path:
    """Checksum every file into the manifest, then rename the temp directory into place."""
    write_manifest(tmp, step)
    publish_dir(tmp, final)  # the same step saved again (a rerun) swaps in, never leaving a gap
    return final


def save_checkpoint(
    output_dir: Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    trainer_state: dict,
    run_config: RunConfig,
    tokenizer: Path | None = None,
    optimizer_state: dict[str, torch.Tensor] | None = None,
    rng: tuple[dict[str, torch.Tensor], dict] | None = None,
) -> Path:
    """Write `output_dir/step_<step>/` atomically and return it. A background save passes host copies:
    `model` on the CPU, `optimizer_state` (from `optimizer_tensors`) and `rng` captured when it began."""
    final, tmp = fresh_temp(output_dir, step)
    t0 = time.perf_counter()
    save_hf(model, tmp)
    (tmp / OPTIMIZER).parent.mkdir(parents=True, exist_ok=True)
    save_file(optimizer_tensors(model, optimizer) if optimizer_state is None else optimizer_state,
              str(tmp / OPTIMIZER))
    write_trainer_files(tmp, step, trainer_state, run_config, tokenizer, rng or capture_rng())
    publish_checkpoint(tmp, final, step)
    log.info("saved checkpoint %s (%.1f s)", final, time.perf_counter() - t0)
    return final


def check_architecture(directory: Path, model_config: ModelConfig) -> None:
    """Refuse a checkpoint of another architecture than `model_config`, naming the fields that differ."""
    diffs = model_differences(read_hf_config(directory), model_config)
    if diffs:
        raise CheckpointError(f"{directory}: a different model than the run config: " + "; ".join(diffs[:4]))


def model_differences(saved: ModelConfig, current: ModelConfig) -> list[str]:
    """`field saved != current` for every architecture field that differs."""
    a = saved.model_dump(exclude={"hf_extras"})
    b = current.model_dump(exclude={"hf_extras"})
    return [f"{k} {a[k]!r} (checkpoint) != {b[k]!r} (config)" for k in a if a[k] != b[k]]


def load_model(directory: Path, model_config: ModelConfig, device: torch.device | str = "cpu") -> nn.Module:
    """The model of a verified checkpoint, in float32 (training keeps fp32 master weights).

    A checkpoint of another architecture than `model_config` is refused, naming the fields that differ.
    """
    directory = Path(directory)
    verify_checkpoint(directory, checksums=True)
    check_architecture(directory, model_config)
    return load_hf(directory, dtype=torch.float32, device=device)


def restore_training_state(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load the optimizer moments and RNG states into place; return the trainer state (step, sampler...)."""
    directory = Path(directory)
    try:
        load_optimizer_tensors(model, optimizer, load_file(str(directory / OPTIMIZER)), directory)
        rng = load_file(str(directory / RNG))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{directory}: unreadable trainer tensors: {e}") from None
    state = read_trainer_state(directory)
    restore_rng(rng, state["rng"])
    return state
