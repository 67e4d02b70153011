"""The code sandbox: right verdicts, and runaway or destructive programs contained within their limits."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from dsv3.config import ConfigError
from dsv3.eval.sandbox import SandboxLimits, isolation, run_program, run_programs

QUICK = SandboxLimits(timeout_s=3, cpu_s=3, memory_mb=512)


def test_a_passing_and_a_failing_program():
    good, bad, crash = run_programs(
        [
            "def f(x):\n    return x + 1\nassert f(1) == 2\nprint('ok')",
            "def f(x):\n    return x\nassert f(1) == 2",
            "raise ValueError('boom')",
        ],
        QUICK,
    )
    assert good.passed and good.stdout == "ok\n"
    assert bad.status == "failed" and "AssertionError" in bad.stderr
    assert crash.status == "failed" and crash.summary() == "ValueError: boom"


def test_exit_before_the_tests_is_a_failure():
    for program in (
        "import sys\nsys.exit(0)\nassert False",
        "exit(0)\nassert False",
        "import os\nos._exit(0)",
    ):
        assert run_program(program, QUICK).status == "failed", program


def test_infinite_loop_times_out_and_is_killed():
    start = time.perf_counter()
    result = run_program("while True:\n    pass", SandboxLimits(timeout_s=1, cpu_s=30))
    assert result.status == "timeout" and result.returncode is None
    assert time.perf_counter() - start < 10


def test_cpu_limit_kills_a_busy_program_before_the_wall_clock():
    result = run_program("while True:\n    pass", SandboxLimits(timeout_s=30, cpu_s=1))
    assert result.status == "failed" and result.returncode is not None and result.returncode < 0
    assert result.seconds < 10


def test_memory_bomb_is_stopped_by_the_address_space_limit():
    result = run_program("chunks = []\nwhile True:\n    chunks.append(bytearray(50 << 20))", QUICK)
    assert result.status == "failed" and "MemoryError" in result.stderr


def test_fork_bomb_is_contained():
    start = time.perf_counter()
    result = run_program("import os\nwhile True:\n    os.fork()", QUICK)
    assert result.status == "failed" and "TypeError" in result.stderr  # fork is guarded
    result = run_program(
        "import multiprocessing\n"
        "def bomb():\n    while True:\n        multiprocessing.Process(target=bomb).start()\n"
        "bomb()",
        QUICK,
    )
    assert result.status == "failed"
    assert time.perf_counter() - start < 20


@pytest.mark.parametrize("isolate", ["auto", "off"])
def test_processes_the_program_starts_die_with_it(isolate):
    """A child forked behind the guard's back (ctypes) that sleeps forever is killed with the program
    (by its PID namespace, or without one by the kill of its process group)."""
    program = (
        "import ctypes, os, time\n"
        "if ctypes.CDLL(None).fork() == 0:\n"
        "    print('child', os.readlink('/proc/self'), flush=True)\n"  # its pid as the host sees it
        "    time.sleep(600)\n"
        "while True:\n    pass\n"
    )
    result = run_program(program, SandboxLimits(timeout_s=2, cpu_s=30, isolate=isolate))
    assert result.status == "timeout"
    pids = [int(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("child")]
    assert pids, result.stdout + result.stderr
    time.sleep(0.2)
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


@pytest.mark.parametrize("isolate", ["auto", "off"])
def test_deleting_files_outside_the_working_directory_fails(tmp_path: Path, isolate):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "inside.txt").write_text("keep me too")
    limits = QUICK.model_copy(update={"isolate": isolate})
    programs = [
        f"import os\nos.remove({str(victim)!r})",
        f"import shutil\nshutil.rmtree({str(folder)!r})",
        f"import os\nos.rename({str(victim)!r}, 'stolen.txt')",
        f"import subprocess\nsubprocess.run(['rm', '-rf', {str(folder)!r}])",
    ]
    if run_program("pass", limits).isolated:  # only a read-only filesystem stops a plain overwrite
        programs.append(f"open({str(victim)!r}, 'w').write('overwritten')")
    for program in programs:
        assert run_program(program, limits).status == "failed", program
    assert victim.read_text() == "keep me"
    assert (folder / "inside.txt").read_text() == "keep me too"


def test_the_working_directory_is_writable_and_temporary():
    result = run_program("import os\nopen('x.txt', 'w').write('hi')\nprint(os.getcwd())", QUICK)
    assert result.passed
    assert not Path(result.stdout.strip()).exists()


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    result = run_program("import os\nassert 'SECRET_TOKEN' not in os.environ, os.environ", QUICK)
    assert result.passed, result.stderr


def test_output_is_capped_and_a_flood_is_stopped_by_the_file_size_limit():
    result = run_program("print('x' * 100_000)", SandboxLimits(max_output_bytes=1000, timeout_s=5))
    assert result.passed and len(result.stdout) == 1000
    flood = run_program("while True:\n    print('y' * 10_000)", SandboxLimits(file_size_mb=1, timeout_s=10))
    # Python ignores SIGXFSZ, so the write past the limit fails instead of killing the process.
    assert flood.status == "failed" and flood.summary() == "OSError: [Errno 27] File too large"


def test_isolation_when_the_machine_allows_it():
    available, reason = isolation()
    if not available:
        with pytest.raises(ConfigError, match="isolation required"):
            run_program("pass", SandboxLimits(isolate="required"))
        return
    result = run_program(
        "import socket\n"
        "try:\n    socket.create_connection(('1.1.1.1', 53), timeout=2)\nexcept OSError as e:\n"
        "    print('blocked', e.errno)\nelse:\n    print('connected')\n"
        "import os\nprint(os.getpid())",
        SandboxLimits(isolate="required", timeout_s=5),
    )
    assert result.passed and result.isolated
    lines = result.stdout.split()
    assert lines[0] == "blocked" and lines[-1] == "1"  # no network; PID 1 of its own namespace


def test_limits_are_validated():
    with pytest.raises(ValueError):
        SandboxLimits(timeout_s=0)
    with pytest.raises(ValueError):
        SandboxLimits(unknown=1)


def test_many_programs_in_parallel_keep_their_order():
    results = run_programs([f"print({i})" for i in range(12)], QUICK, workers=4)
    assert [int(r.stdout) for r in results] == list(range(12))
    assert os.cpu_count()
