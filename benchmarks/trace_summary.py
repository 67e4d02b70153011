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
    launches, copies), largest first: what a host-bound loop spends launching.

    python benchmarks/trace_summary.py runs/x/profile/rank0.json [rank1.json ...] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

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
