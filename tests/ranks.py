"""Run functions on N CPU ranks (gloo) the way torchrun would, cheaply: N processes are spawned once and
run a list of jobs one after another, each in a fresh process group on its own port.

A job is `(function, kwargs)`; the function must be importable (it runs in spawned children) and is
called on every rank with the torchrun environment set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_PORT...).
Rank 0's return value (JSON-able) comes back to the test. A rank that raises, or a job past the
deadline, ends every rank and fails the test with the rank's traceback.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

__all__ = ["run_on_ranks"]

Job = tuple[Callable[..., Any], dict[str, Any]]


def _free_ports(n: int) -> list[int]:
    """n ports free now, below Linux's ephemeral range (32768-60999): the ports are picked before the
    jobs run, and an earlier job's gloo connections take ephemeral ports, which once collided with a
    later job's store port (EADDRINUSE)."""
    ports: list[int] = []
    rng = random.Random()
    while len(ports) < n:
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        if port not in ports:
            ports.append(port)
    return ports


def _worker(rank: int, world: int, jobs: list[Job], ports: list[int], results: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1")
    for i, ((fn, kwargs), port) in enumerate(zip(jobs, ports, strict=True)):
        os.environ["MASTER_PORT"] = str(port)
        out = fn(**kwargs)
        if rank == 0:
            Path(results, f"{i}.json").write_text(json.dumps(out))


def run_on_ranks(world: int, jobs: list[Job], results: Path, timeout_s: float = 600) -> list[Any]:
    """Run `jobs` in order on `world` spawned ranks; rank 0's return values, in job order."""
    results.mkdir(parents=True, exist_ok=True)
    ports = _free_ports(len(jobs))
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS",)}
    os.environ["OMP_NUM_THREADS"] = "1"  # the children share the cores, as torchrun arranges
    try:
        ctx = mp.start_processes(_worker, args=(world, jobs, ports, str(results)), nprocs=world, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + timeout_s
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"{world} ranks did not finish {len(jobs)} jobs in {timeout_s:.0f} s")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return [json.loads((results / f"{i}.json").read_text()) for i in range(len(jobs))]
