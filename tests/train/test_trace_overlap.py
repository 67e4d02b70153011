"""benchmarks/trace_overlap.py: communication behind computation, from a hand-made trace."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "trace_overlap", Path(__file__).resolve().parents[2] / "benchmarks" / "trace_overlap.py")
trace_overlap = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(trace_overlap)


def _kernel(name: str, ts: float, dur: float) -> dict:
    return {"cat": "kernel", "name": name, "ts": ts, "dur": dur}


def test_nccl_time_splits_into_behind_compute_and_exposed():
    # compute 0-3000 and 2000-4000 µs (one busy span 0-4000), then idle, then 6000-7000; NCCL 3000-5000
    # (1000 behind compute, 1000 exposed) and 6500-8000 (500 behind, 1000 exposed); CPU events ignored
    events = [_kernel("gemm", 0, 3000), _kernel("triton_poi", 2000, 2000), _kernel("gemm", 6000, 1000),
              _kernel("ncclDevKernel_AllGather", 3000, 2000),
              _kernel("ncclDevKernel_ReduceScatter", 6500, 1500),
              {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 9000}]
    got = trace_overlap.overlap_report({"traceEvents": events}, steps=2)
    assert got == {"window_ms": 4.0, "compute_busy_ms": 2.5, "nccl_busy_ms": 1.75,
                   "nccl_behind_compute_ms": 0.75, "nccl_exposed_ms": 1.0, "idle_ms": 0.5, "steps": 2}


def test_a_trace_without_gpu_kernels_is_refused():
    with pytest.raises(ValueError, match="no GPU kernels"):
        trace_overlap.overlap_report({"traceEvents": [{"cat": "cpu_op", "name": "x", "ts": 0, "dur": 1}]})
