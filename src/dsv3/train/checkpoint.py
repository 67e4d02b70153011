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

import hashlib
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dsv3.config import ModelConfig, RunConfig
from dsv3.model.safetensors_dir import CheckpointError  # one error type for every checkpoint

__all__ = [
    "CheckpointError",
    "checkpoint_name",
    "save_checkpoint",
    "load_model",
    "restore_training_state",
    "verify_checkpoint",
    "list_checkpoints",
    "resolve_resume",
    "prune_checkpoints",
    "best_checkpoint",
    "read_trainer_state",
    "model_differences",
    "write_json_atomic",
    "remove_stale_temps",
]

log = logging.getLogger(__name__)

PREFIX = "step_"
TMP_PREFIX = ".tmp-"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer/state.json"
RUN_CONFIG = "trainer/run_config.json"
OPTIMIZER = "trainer/optimizer.safetensors"
RNG = "trainer/rng.safetensors"
FORMAT_VERSION = 1


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def _step_of(path: Path) -> int | None:
    suffix = path.name[len(PREFIX):]
    return int(suffix) if path.name.startswith(PREFIX) and suffix.isdigit() else None


# --------------------------------------------------------------------------------------------
# Durable file operations
# --------------------------------------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temp file in the same directory, fsync, rename over `path`."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(directory: Path, step: int) -> None:
    """Record every file's size and checksum; its presence marks the checkpoint complete."""
    files = {}
    for p in sorted(directory.rglob("*")):
        if p.is_dir():
            _fsync_path(p)
        elif p.name != MANIFEST:
            _fsync_path(p)
            files[p.relative_to(directory).as_posix()] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
    manifest = {"format_version": FORMAT_VERSION, "step": step, "files": files}
    with open(directory / MANIFEST, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    _fsync_path(directory)


def verify_checkpoint(directory: Path, checksums: bool = False) -> dict:
    """The manifest of a complete checkpoint; a missing, truncated or altered file raises CheckpointError."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: incomplete checkpoint (no {MANIFEST}: save cut off)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{directory}/{MANIFEST}: unreadable manifest: {e}") from None
    for name, meta in files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing file listed in the manifest")
        if path.stat().st_size != meta["bytes"]:
            raise CheckpointError(f"{path}: {path.stat().st_size} bytes, manifest says {meta['bytes']}")
        if checksums and _sha256(path) != meta["sha256"]:
            raise CheckpointError(f"{path}: checksum differs from the manifest (file altered or corrupt)")
    return manifest


# --------------------------------------------------------------------------------------------
# Discovery, resume and retention
# --------------------------------------------------------------------------------------------


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first. Cut-off saves are skipped, with a log line."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        step = _step_of(p)
        if step is None or not p.is_dir():
            continue
        try:
            verify_checkpoint(p)
        except CheckpointError as e:
            log.warning("skipping %s", e)
            continue
        found.append((step, p))
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str | None, output_dir: Path) -> Path | None:
    """`auto` = newest complete checkpoint in output_dir (None when there is none); else that directory."""
    if resume is None:
        return None
    if resume == "auto":
        ckpts = list_checkpoints(output_dir)
        return ckpts[-1] if ckpts else None
    path = Path(resume)
    if not (path / MANIFEST).exists() and (inside := list_checkpoints(path)):
        return inside[-1]  # a run directory: its newest checkpoint
    verify_checkpoint(path)
    return path


def read_trainer_state(directory: Path) -> dict:
    try:
        return json.loads((Path(directory) / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{directory}/{TRAINER_STATE}: unreadable: {e}") from None


def best_checkpoint(output_dir: Path) -> Path | None:
    """The complete checkpoint with the lowest validation loss (None when none was evaluated)."""
    scored = [
        (state["val_loss"], p)
        for p in list_checkpoints(output_dir)
        if (state := read_trainer_state(p)).get("val_loss") is not None
    ]
    return min(scored, key=lambda t: t[0])[1] if scored else None


def prune_checkpoints(output_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints and the one with the best validation loss."""
    ckpts = list_checkpoints(output_dir)
    keep = set(ckpts[-keep_last:])
    if (best := best_checkpoint(output_dir)) is not None:
        keep.add(best)
    removed = []
    for p in ckpts:
        if p not in keep:
            _remove_dir(p)
            removed.append(p)
    return removed


def _remove_dir(path: Path) -> None:
    # Rename first: a half-deleted directory must never look like a checkpoint.
    trash = path.with_name(f"{TMP_PREFIX}trash-{path.name}-{os.getpid()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_stale_temps(output_dir: Path) -> None:
    """Clear temp directories left by a save that was killed (ours and the model writer's)."""
    if not Path(output_dir).is_dir():
        return
    for p in Path(output_dir).iterdir():
        if not (p.name.startswith(".") and "tmp-" in p.name):
            continue
        log.info("removing %s (left by an interrupted save)", p)
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# State that is not the model: optimizer and RNG, as tensors + JSON
# --------------------------------------------------------------------------------------------


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]


def optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state keyed by parameter name, so it survives reordering."""
    names = _param_names(model, optimizer)
    state = optimizer.state_dict()["state"]
    out = {}
    for idx, per_param in state.items():
        for key, value in per_param.items():
            out[f"{names[idx]}/{key}"] = value.detach().cpu().contiguous()
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


def save_checkpoint(
    output_dir: Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    run_config: RunConfig,
    tokenizer: Path | None = None,
) -> Path:
    """Write `output_dir/step_<step>/` atomically and return it."""
    from dsv3.model.hf import save_hf  # the model's own HF writer: one home for the weight layout

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / checkpoint_name(step)
    tmp = output_dir / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    t0 = time.perf_counter()
    save_hf(model, tmp)
    (tmp / OPTIMIZER).parent.mkdir(parents=True, exist_ok=True)
    save_file(optimizer_tensors(model, optimizer), str(tmp / OPTIMIZER))
    rng_tensors, rng_meta = capture_rng()
    save_file(rng_tensors, str(tmp / RNG))
    state = {**trainer_state, "step": step, "rng": rng_meta, "format_version": FORMAT_VERSION}
    (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1, sort_keys=True), encoding="utf-8")
    (tmp / RUN_CONFIG).write_text(run_config.model_dump_json(indent=1), encoding="utf-8")
    if tokenizer is not None:
        from dsv3.train.sample import copy_tokenizer

        copy_tokenizer(Path(tokenizer), tmp)
    _write_manifest(tmp, step)
    if final.exists():  # the same step saved again (e.g. a rerun): swap, never leave a gap
        _remove_dir(final)
    os.rename(tmp, final)
    _fsync_path(output_dir)
    log.info("saved checkpoint %s (%.1f s)", final, time.perf_counter() - t0)
    return final


def model_differences(saved: ModelConfig, current: ModelConfig) -> list[str]:
    """`field saved != current` for every architecture field that differs."""
    a = saved.model_dump(exclude={"hf_extras"})
    b = current.model_dump(exclude={"hf_extras"})
    return [f"{k} {a[k]!r} (checkpoint) != {b[k]!r} (config)" for k in a if a[k] != b[k]]


def load_model(directory: Path, model_config: ModelConfig, device: torch.device | str = "cpu") -> nn.Module:
    """The model of a verified checkpoint, in float32 (training keeps fp32 master weights).

    A checkpoint of another architecture than `model_config` is refused, naming the fields that differ.
    """
    from dsv3.model.hf import load_hf, read_hf_config

    directory = Path(directory)
    verify_checkpoint(directory, checksums=True)
    diffs = model_differences(read_hf_config(directory), model_config)
    if diffs:
        raise CheckpointError(f"{directory}: a different model than the run config: " + "; ".join(diffs[:4]))
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
