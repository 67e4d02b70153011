"""Where a profiled window's wall time goes on the GPU: busy, communicating, or idle waiting for the host.

A kernel table (profile/rank<r>.txt) sums kernel times, but a step is slow for what happens *between*
kernels too: a host that syncs and then launches slower than the GPU runs, or a collective that waits
inside its kernel for a slower rank. This reads the Chrome trace `train.profile_steps` writes
(profile/rank<r>.json) and prints one JSON line per trace:

  - window_ms: first kernel's start to last kernel's end;
  - compute_busy_ms: time at least one non-communication kernel runs (any stream);
  - comm_ms / comm_exposed_ms: time inside NCCL kernels, and the part with no compute kernel beside it
    (a collective in the critical path, or one waiting for another rank);
  - idle_ms and the largest idle gaps: no kernel at all (the GPU waits for the host);
  - host_sync_ms: host time in calls that wait for the GPU (stream/device/event synchronize, blocking
    copies to the host), and the top operators by device time;
  - host_api_ms: the host's time in each CUDA runtime and driver call (graph launches, kernel
    launches, copies), largest first: what a host-bound loop spends launching;
  - idle_by_launcher_ms: the idle time before each kernel, summed by the host operator that launched
    that kernel (the outermost one enclosing its launch on that thread, e.g. the optimizer's step or
    a compiled region): which part of the host's loop the GPU waited for;
  - host_ops_ms: the host's time in its outermost operators, by name, largest first.

    python benchmarks/trace_summary.py runs/x/profile/rank0.json [rank1.json ...] [--steps 3]
"""

from __future__ import annotations

import argparse
import bisect
import json
from collections import defaultdict
from pathlib import Path

HOST_OPS = ("cpu_op", "user_annotation", "python_function")
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy ")


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Merge overlapping [start, end) intervals (µs)."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(end - start for start, end in intervals)


def _minus(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The parts of merged intervals `a` not covered by merged intervals `b`."""
    out, j = [], 0
    for start, end in a:
        cur = start
        while j < len(b) and b[j][1] <= cur:
            j += 1
        i = j
        while i < len(b) and b[i][0] < end:
            if b[i][0] > cur:
                out.append((cur, b[i][0]))
            cur = max(cur, b[i][1])
            i += 1
        if cur < end:
            out.append((cur, end))
    return out


def _top_level(events: list[dict]) -> dict[int, tuple[list[float], list[tuple[float, str]]]]:
    """Per host thread, its outermost operators: (start times, (end, name)), sorted by start."""
    host = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in HOST_OPS),
                  key=lambda e: (e["tid"], e["ts"], -e["dur"]))  # fmt: skip
    out: dict[int, tuple[list[float], list[tuple[float, str]]]] = {}
    for e in host:
        starts, spans = out.setdefault(e["tid"], ([], []))
        if spans and e["ts"] < spans[-1][0]:
            continue  # inside the operator before it
        starts.append(e["ts"])
        spans.append((e["ts"] + e["dur"], e["name"]))
    return out


def _idle_by_launcher(
    events: list[dict], kernels: list[dict], busy: list[tuple[float, float]], threads: dict
) -> dict[str, float]:
    """Idle time (µs) before each busy stretch, by the outermost host operator (`threads`:
    `_top_level`) that launched its first kernel (matched through the launch's correlation id)."""
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("ph") == "X" and e.get("cat") in ("cuda_runtime", "cuda_driver")
                and "correlation" in e.get("args", {})}  # fmt: skip
    first = {}  # a busy stretch's start → the kernel that starts it
    for e in kernels:
        first.setdefault(e["ts"], e)
    idle: dict[str, float] = defaultdict(float)
    for before, (start, _) in zip(busy, busy[1:], strict=False):
        kernel = first.get(start)
        launch = launches.get(kernel.get("args", {}).get("correlation")) if kernel else None
        name = "(unknown)"
        if launch is not None and launch["tid"] in threads:
            starts, spans = threads[launch["tid"]]
            i = bisect.bisect_right(starts, launch["ts"]) - 1
            if i >= 0 and spans[i][0] >= launch["ts"]:
                name = spans[i][1]
        idle[name[:80]] += start - before[1]
    return idle


def summarize(path: Path, steps: int) -> dict:
    events = json.loads(path.read_text())["traceEvents"]
    gpu = ("kernel", "gpu_memcpy", "gpu_memset")
    kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") in gpu]
    if not kernels:
        raise SystemExit(f"{path}: no GPU kernels in the trace (a CPU run?)")
    comm = [(e["ts"], e["ts"] + e["dur"]) for e in kernels if "nccl" in e["name"].lower()]
    compute = [(e["ts"], e["ts"] + e["dur"]) for e in kernels if "nccl" not in e["name"].lower()]
    busy, compute_u, comm_u = _union(comm + compute), _union(compute), _union(comm)
    start, end = busy[0][0], busy[-1][1]
    gaps = sorted((b[0] - a[1] for a, b in zip(busy, busy[1:], strict=False)), reverse=True)
    by_kernel: dict[str, float] = defaultdict(float)
    for e in kernels:
        by_kernel[e["name"][:80]] += e["dur"]
    host_sync = sum(e["dur"] for e in events if e.get("ph") == "X" and e.get("cat") == "cuda_runtime"
                    and e["name"].startswith(SYNC_CALLS))
    by_api: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("cuda_runtime", "cuda_driver"):
            by_api[e["name"]] += e["dur"]
    per = 1e3 * steps  # µs in the window → ms a step
    threads = _top_level(events)
    idle = sorted(_idle_by_launcher(events, kernels, busy, threads).items(), key=lambda kv: -kv[1])[:8]
    by_op: dict[str, float] = defaultdict(float)
    for starts, spans in threads.values():
        for begin, (finish, name) in zip(starts, spans, strict=True):
            by_op[name[:80]] += finish - begin
    ops = sorted(by_op.items(), key=lambda kv: -kv[1])[:8]
    top = sorted(by_kernel.items(), key=lambda kv: -kv[1])[:12]
    api = sorted(by_api.items(), key=lambda kv: -kv[1])[:8]
    return {
        "trace": str(path), "steps": steps,
        "window_ms": round((end - start) / per, 2),
        "compute_busy_ms": round(_length(compute_u) / per, 2),
        "comm_ms": round(_length(comm_u) / per, 2),
        "comm_exposed_ms": round(_length(_minus(comm_u, compute_u)) / per, 2),
        "idle_ms": round(((end - start) - _length(busy)) / per, 2),
        "idle_gaps_over_50us": sum(1 for g in gaps if g > 50) / steps,
        "largest_gaps_ms": [round(g / 1e3, 2) for g in gaps[:5]],
        "host_sync_ms": round(host_sync / per, 2),
        "top_kernels_ms": {name: round(us / per, 2) for name, us in top},
        "host_api_ms": {name: round(us / per, 3) for name, us in api},
        "idle_by_launcher_ms": {name: round(us / per, 3) for name, us in idle},
        "host_ops_ms": {name: round(us / per, 3) for name, us in ops},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("traces", type=Path, nargs="+")
    p.add_argument("--steps", type=int, default=3, help="steps in the window (per-step figures)")
    args = p.parse_args()
    for path in args.traces:
        print(json.dumps(summarize(path, args.steps)), flush=True)


if __name__ == "__main__":
    main()
