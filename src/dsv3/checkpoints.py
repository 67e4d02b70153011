"""Checkpoint directories on disk: what makes one complete, finding them in a run, and the one resolver.

A checkpoint is a directory `step_NNNNNN/` holding a Hugging Face model (config.json, *.safetensors),
the tokenizer, `trainer/` state, and last a `manifest.json` with every file's size and sha256: a
directory without a readable manifest is a save that was cut off and is never used. A distributed run
writes the weights and optimizer state sharded instead (`dcp/`, torch.distributed.checkpoint, one file
per rank) beside the same config.json, tokenizer, trainer state and manifest; `is_sharded` tells them
apart, and everything else here treats both alike. A run's
output_dir holds several; `resolve_checkpoint(path, which)` turns a checkpoint or a run directory
into one checkpoint for every command (generate and eval take the best by validation loss,
convert and resume the last).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Literal

from dsv3.config import ConfigError
from dsv3.io import fsync_path, write_json_atomic

__all__ = [
    "CheckpointError",
    "PREFIX",
    "FORMAT_VERSION",
    "MANIFEST",
    "TRAINER_STATE",
    "RUN_CONFIG",
    "SHARDED_DIR",
    "is_sharded",
    "checkpoint_name",
    "write_manifest",
    "verify_checkpoint",
    "list_checkpoints",
    "read_trainer_state",
    "best_checkpoint",
    "resolve_checkpoint",
    "checkpoint_tokenizer",
]

log = logging.getLogger(__name__)

PREFIX = "step_"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer/state.json"
RUN_CONFIG = "trainer/run_config.json"
SHARDED_DIR = "dcp"  # torch.distributed.checkpoint: .metadata + one __<rank>_0.distcp per rank
FORMAT_VERSION = 1

Which = Literal["best", "last"]


class CheckpointError(ConfigError):
    """A checkpoint that cannot be read or written, in one line naming the file and the tensor."""


def is_sharded(directory: Path) -> bool:
    """Whether a checkpoint holds its tensors as torch.distributed.checkpoint shards (a distributed run's)."""
    return (Path(directory) / SHARDED_DIR / ".metadata").is_file()


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def _step_of(path: Path) -> int | None:
    suffix = path.name[len(PREFIX):]
    return int(suffix) if path.name.startswith(PREFIX) and suffix.isdigit() else None


# --------------------------------------------------------------------------------------------
# The manifest: what makes a checkpoint complete
# --------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path, step: int) -> None:
    """Record every file's size and checksum; its presence marks the checkpoint complete."""
    files = {}
    for p in sorted(directory.rglob("*")):
        if p.is_dir():
            fsync_path(p)
        elif p.name != MANIFEST:
            fsync_path(p)
            files[p.relative_to(directory).as_posix()] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
    manifest = {"format_version": FORMAT_VERSION, "step": step, "files": files}
    write_json_atomic(directory / MANIFEST, manifest, indent=1, sort_keys=True)


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
# Discovery
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


def resolve_checkpoint(path: str | Path, which: Which = "last") -> Path:
    """A checkpoint directory as given (verified when it has a manifest; a plain Hugging Face model
    directory is taken as is), or a run directory's `last` complete checkpoint or its `best` by
    validation loss (the last when none was evaluated)."""
    path = Path(path)
    if which not in ("best", "last"):
        raise ConfigError(f"which={which!r}: expected best or last")
    if (path / MANIFEST).exists():
        verify_checkpoint(path)
        return path
    if _step_of(path) is not None and path.is_dir():
        verify_checkpoint(path)  # a step_* directory without its manifest: raises
    found = list_checkpoints(path)
    if found:
        return (best_checkpoint(path) or found[-1]) if which == "best" else found[-1]
    if (path / "config.json").is_file():
        return path
    raise CheckpointError(f"{path}: neither a checkpoint (config.json) nor a run directory with checkpoints")


def checkpoint_tokenizer(directory: Path) -> Path:
    """The tokenizer a checkpoint generates with: its own tokenizer.json, else the one its run named."""
    directory = Path(directory)
    if (directory / "tokenizer.json").is_file():
        return directory / "tokenizer.json"
    run_config = directory / RUN_CONFIG
    if run_config.is_file():
        ref = json.loads(run_config.read_text(encoding="utf-8")).get("data", {}).get("tokenizer")
        if ref:
            return Path(ref)
    raise CheckpointError(f"{directory}: no tokenizer.json and no run config naming one: pass --tokenizer")
