"""Run untrusted Python programs (model completions plus their tests) and report whether they passed.

    results = run_programs(["def f():\\n    return 1\\nassert f() == 1"], SandboxLimits(timeout_s=5))
    results[0].passed  # True

Each program runs in a fresh process (`sandbox_child.py`, see there for the order of steps) in a
temporary working directory that is deleted afterwards, with a scrubbed environment and stdin
from /dev/null, under these limits:

    wall clock   timeout_s: past it the program's whole process group is killed (SIGKILL)
    CPU          cpu_s seconds (SIGXCPU, then SIGKILL a second later)
    memory       memory_mb of address space (allocation fails with MemoryError)
    files        file_size_mb per written file, stdout and stderr included (SIGXFSZ past it)
    processes    max_processes (RLIMIT_NPROC; Linux does not enforce it for root outside a user
                 namespace, which is why isolation matters when evaluating as root)
    output       the first max_output_bytes of stdout and of stderr are kept

and, on Linux where user namespaces are allowed (`isolation()` says whether they are), with no
network, a read-only filesystem outside its working directory, and a PID namespace of its own,
so nothing it starts outlives it. Where they are not, the run goes on without them (`isolate`
"auto", logged once) or refuses to (`isolate` "required").

This is not a security boundary against a determined attacker: it keeps a model's careless or
runaway code (an infinite loop, a fork or memory bomb, an rm of the wrong path) from harming the
evaluation or the machine. Run evaluations of untrusted models inside a VM or container too.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from dsv3.config import ConfigError

__all__ = ["SandboxLimits", "ExecResult", "isolation", "run_program", "run_programs"]

log = logging.getLogger(__name__)

CHILD = Path(__file__).with_name("sandbox_child.py")
PROGRAM = "program.py"
EXIT_ISOLATION_FAILED = 125  # sandbox_child.EXIT_ISOLATION_FAILED
MB = 1 << 20


class SandboxLimits(BaseModel):
    """What one program may use; see the module docstring."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timeout_s: float = Field(10.0, gt=0)
    cpu_s: int = Field(10, ge=1)
    memory_mb: int = Field(2048, ge=64)
    file_size_mb: int = Field(16, ge=1)
    max_processes: int = Field(16, ge=1)
    open_files: int = Field(64, ge=16)
    max_output_bytes: int = Field(16384, ge=0)
    isolate: Literal["auto", "required", "off"] = "auto"


@dataclass(frozen=True)
class ExecResult:
    status: Literal["passed", "failed", "timeout"]
    returncode: int | None  # None after a timeout; negative: killed by that signal
    stdout: str
    stderr: str
    seconds: float
    isolated: bool

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def summary(self) -> str:
        """One line saying why it failed (for sample logs)."""
        if self.status != "failed":
            return self.status
        if self.returncode is not None and self.returncode < 0:
            return f"killed by {signal.Signals(-self.returncode).name}"
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-1][:300] if lines else f"exit status {self.returncode}"


def _environment(workdir: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _command(*args: str) -> list[str]:
    return [sys.executable, "-I", "-B", str(CHILD), *args]


@functools.cache
def isolation() -> tuple[bool, str]:
    """Whether this machine lets the sandbox use namespaces, and if not, why (probed once)."""
    if not sys.platform.startswith("linux"):
        return False, f"namespaces need Linux, not {sys.platform}"
    with tempfile.TemporaryDirectory(prefix="dsv3-sandbox-") as workdir:
        done = subprocess.run(
            _command("--probe"),
            cwd=workdir,
            env=_environment(workdir),
            capture_output=True,
            text=True,
            timeout=60,
        )
    try:
        report = json.loads(done.stdout)
        return bool(report["isolated"]), str(report["reason"])
    except (ValueError, KeyError):
        return False, f"probe failed: {done.stderr.strip()[-300:]}"


def _isolate(limits: SandboxLimits) -> bool:
    if limits.isolate == "off":
        return False
    available, reason = isolation()
    if not available:
        if limits.isolate == "required":
            raise ConfigError(f"sandbox: isolation required but unavailable here: {reason}")
        _warn_once(reason)
    return available


@functools.cache
def _warn_once(reason: str) -> None:
    log.warning(
        "sandbox: running programs without namespaces (network, read-only filesystem, PID namespace): %s",
        reason,
    )


def _read(f, limit: int) -> str:
    f.seek(0)
    return f.read(limit).decode("utf-8", errors="replace")


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def run_program(program: str, limits: SandboxLimits | None = None) -> ExecResult:
    """Run one Python program under `limits` (see the module docstring)."""
    limits = limits or SandboxLimits()
    isolate = _isolate(limits)
    config = {
        "isolate": isolate,
        "program": PROGRAM,
        "limits": {
            "cpu_s": limits.cpu_s,
            "memory_bytes": limits.memory_mb * MB,
            "file_size_bytes": limits.file_size_mb * MB,
            "open_files": limits.open_files,
            "max_processes": limits.max_processes,
        },
    }
    workdir = tempfile.mkdtemp(prefix="dsv3-sandbox-")
    try:
        Path(workdir, PROGRAM).write_text(program, encoding="utf-8")
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            start = time.perf_counter()
            proc = subprocess.Popen(
                _command(json.dumps(config)),
                cwd=workdir,
                env=_environment(workdir),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
            try:
                returncode: int | None = proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                returncode = None
            # The whole group goes, timed out or not: nothing the program started may outlive it.
            _kill_group(proc.pid)
            proc.wait()
            seconds = time.perf_counter() - start
            stdout, stderr = _read(out, limits.max_output_bytes), _read(err, limits.max_output_bytes)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if returncode == EXIT_ISOLATION_FAILED and "sandbox: isolation failed" in stderr:
        raise ConfigError(stderr.strip().splitlines()[-1])
    status = "timeout" if returncode is None else "passed" if returncode == 0 else "failed"
    return ExecResult(status, returncode, stdout, stderr, seconds, isolate)


def run_programs(
    programs: Sequence[str],
    limits: SandboxLimits | None = None,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[ExecResult]:
    """Run programs concurrently (`workers` at a time, default: one per CPU), results in order."""
    if workers is None:  # the CPUs this process may run on (a container may see more than it has)
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

    def one(program: str) -> ExecResult:
        result = run_program(program, limits)
        if progress:
            progress(1)
        return result

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, programs))
