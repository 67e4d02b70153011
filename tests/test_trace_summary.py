"""benchmarks/trace_summary.py on a hand-made Chrome trace: the figures it reports for GPU traces."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trace_summary():
    spec = importlib.util.spec_from_file_location("trace_summary", ROOT / "benchmarks" / "trace_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _op(name: str, ts: float, dur: float, cat: str = "cpu_op", tid: int = 1, **args) -> dict:
    return {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "tid": tid, "pid": 1, "args": args}


def test_idle_time_is_charged_to_the_host_operator_that_launched_the_next_kernel(trace_summary, tmp_path):
    events = [
        # host: a forward launching two kernels, then an optimizer step launching two
        _op("forward", 0, 100),
        _op("aten::mm", 10, 20),  # nested: the forward is the outermost operator
        _op("cudaLaunchKernel", 12, 5, cat="cuda_runtime", correlation=1),
        _op("cudaLaunchKernel", 40, 5, cat="cuda_runtime", correlation=2),
        _op("Optimizer.step#AdamW.step", 200, 300, cat="user_annotation"),
        _op("cudaLaunchKernel", 210, 5, cat="cuda_runtime", correlation=3),
        _op("cudaLaunchKernel", 450, 5, cat="cuda_runtime", correlation=4),
        # GPU: k1 [20, 60), k2 [60, 100) back to back, idle, k3 [250, 260), idle, k4 [460, 470)
        _op("k1", 20, 40, cat="kernel", tid=7, correlation=1),
        _op("k2", 60, 40, cat="kernel", tid=7, correlation=2),
        _op("k3", 250, 10, cat="kernel", tid=7, correlation=3),
        _op("nccl_k4", 460, 10, cat="kernel", tid=7, correlation=4),
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    out = trace_summary.summarize(path, steps=1)
    assert out["window_ms"] == pytest.approx(0.45)
    assert out["compute_busy_ms"] == pytest.approx(0.09)
    assert out["comm_ms"] == pytest.approx(0.01)
    assert out["idle_ms"] == pytest.approx(0.35)
    # 150 µs before k3 and 200 µs before k4, both launched inside the optimizer's step
    assert out["idle_by_launcher_ms"] == {"Optimizer.step#AdamW.step": pytest.approx(0.35)}
    assert out["largest_gaps_ms"] == [0.2, 0.15]
    # outermost host operators only: aten::mm is inside the forward
    assert out["host_ops_ms"] == {"Optimizer.step#AdamW.step": pytest.approx(0.3),
                                  "forward": pytest.approx(0.1)}
