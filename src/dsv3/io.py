"""Durable writes, in one place: a temp name beside the target → fsync → rename → fsync the folder.

Whatever a crash interrupts leaves a hidden temp (`.NAME.PID.tmp`) that readers never take for a
finished file or directory, and that `sweep_temps` clears on the next run. Files keep the umask's
mode (no mkstemp). Checkpoints, shards, documents, tokenizers, reports and metrics all go through
these functions.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "temp_path",
    "is_temp",
    "fsync_path",
    "commit",
    "atomic_open",
    "write_text_atomic",
    "write_json_atomic",
    "atomic_dir",
    "publish_dir",
    "remove_dir",
    "sweep_temps",
]

TMP_SUFFIX = ".tmp"


def temp_path(path: Path | str, tag: str = "") -> Path:
    """The hidden temp name `path` is written under first: `.NAME[.tag].PID.tmp` in the same folder."""
    path = Path(path)
    tag = f".{tag}" if tag else ""
    return path.with_name(f".{path.name}{tag}.{os.getpid()}{TMP_SUFFIX}")


def is_temp(path: Path) -> bool:
    """Whether `path` is a temp that `temp_path` made (an interrupted write, or a directory being removed)."""
    return path.name.startswith(".") and path.name.endswith(TMP_SUFFIX)


def fsync_path(path: Path | str) -> None:
    """fsync a file or a directory (a directory's fsync makes the renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: Path, path: Path) -> None:
    """Make the written temp `tmp` the file `path`: fsync it, rename it over `path`, fsync the folder."""
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


@contextlib.contextmanager
def atomic_open(path: Path | str, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """A file that appears under `path` only if the block ends without an exception ("wb" or "w")."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open: mode {mode!r} (expected 'wb' or 'w')")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    f = open(tmp, mode, encoding=encoding or ("utf-8" if mode == "w" else None))  # noqa: SIM115
    try:
        yield f
        f.flush()
        f.close()
        commit(tmp, path)
    except BaseException:
        f.close()
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path | str, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def write_json_atomic(path: Path | str, obj: Any, indent: int = 2, sort_keys: bool = False) -> None:
    """Indented JSON, written atomically (keys in insertion order unless `sort_keys`)."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n"
    write_text_atomic(path, text)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fsync_path(Path(dirpath) / name)
        fsync_path(dirpath)


def publish_dir(tmp: Path, path: Path) -> None:
    """Move the finished directory `tmp` to `path` (replacing what is there without a gap in which
    neither exists under a non-temp name), and make the rename durable."""
    if path.exists():
        old = temp_path(path, "old")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    fsync_path(path.parent)


@contextlib.contextmanager
def atomic_dir(path: Path | str, overwrite: bool = False) -> Iterator[Path]:
    """A temp directory to fill; when the block ends without an exception every file in it is
    fsynced and it is renamed to `path`. `overwrite=False` refuses an existing `path` up front."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        publish_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_dir(path: Path) -> None:
    """Delete a directory; it is renamed to a temp first, so a half-deleted one never keeps its name."""
    trash = temp_path(path, "trash")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def sweep_temps(folder: Path | str, recursive: bool = False) -> list[Path]:
    """Delete the temps an interrupted write left in `folder` (and below it when `recursive`)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in (folder.rglob(f".*{TMP_SUFFIX}") if recursive else folder.iterdir()) if is_temp(p)]
    for p in found:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return found
