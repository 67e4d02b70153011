"""How much of a profiled window's communication ran behind computation, from a Chrome trace.

`train.profile_steps` writes `profile/rank<r>.json` on every rank. This reads one and splits the GPU
kernels into NCCL's (names starting with "nccl") and the rest, then reports, in milliseconds: the
window (first kernel start to last kernel end), the compute kernels' busy time (their union), the
NCCL kernels' busy time, and how much of it overlaps compute. An NCCL kernel's time includes its wait
for the slower rank, so "exposed" is communication plus skew, the part a rank stood idle for it.

    python benchmarks/trace_overlap.py RUN/profile/rank0.json [--steps 2]   # one JSON line
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted, merged [start, end) intervals."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def covered(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Total length of the intersection of two merged interval lists."""
    total, j = 0.0, 0
    for start, end in a:
        while j < len(b) and b[j][1] <= start:
            j += 1
        k = j
        while k < len(b) and b[k][0] < end:
            total += min(end, b[k][1]) - max(start, b[k][0])
            k += 1
    return total


def overlap_report(trace: dict, steps: int = 1) -> dict:
    """The trace's kernels → times in ms per step (see the module docstring)."""
    kernels = [e for e in trace.get("traceEvents", []) if e.get("cat") == "kernel" and e.get("dur")]
    if not kernels:
        raise ValueError("no GPU kernels in the trace (a CPU run, or no profiled window)")
    is_nccl = lambda e: e["name"].lower().startswith("nccl")  # noqa: E731
    nccl = union([(e["ts"], e["ts"] + e["dur"]) for e in kernels if is_nccl(e)])
    compute = union([(e["ts"], e["ts"] + e["dur"]) for e in kernels if not is_nccl(e)])
    busy = lambda spans: sum(end - start for start, end in spans)  # noqa: E731
    window = max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)
    hidden = covered(nccl, compute)
    per_step = lambda us: round(us / 1000 / steps, 2)  # noqa: E731
    return {"window_ms": per_step(window), "compute_busy_ms": per_step(busy(compute)),
            "nccl_busy_ms": per_step(busy(nccl)), "nccl_behind_compute_ms": per_step(hidden),
            "nccl_exposed_ms": per_step(busy(nccl) - hidden),
            "idle_ms": per_step(window - busy(union(compute + nccl))), "steps": steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", type=Path)
    p.add_argument("--steps", type=int, default=1, help="steps in the profiled window (figures are per step)")
    args = p.parse_args()
    try:
        trace = json.loads(args.trace.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"{args.trace}: not a readable Chrome trace ({e})") from None
    print(json.dumps({"trace": str(args.trace), **overlap_report(trace, args.steps)}))


if __name__ == "__main__":
    main()
