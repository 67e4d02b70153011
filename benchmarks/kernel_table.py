"""Where a step's time goes: torch.profiler's kernel table of a few calls of a step function, and
cProfile's table of the host's Python around it.

Shared by the benchmarks that take `--profile PATH` (train_step.py, serve.py). A CUDA graph's
replay is profiled kernel by kernel (CUPTI traces the graph's nodes), so the table of a captured
decode step lists the kernels inside it. The host table says whether a loop that keeps the device
busy with work queued ahead (the engine's async scheduling) is bound by its own Python instead.
"""

from __future__ import annotations

import cProfile
import io
import pstats
from collections.abc import Callable

import torch


def write_kernel_table(
    path: str, step: Callable[[], object], n_steps: int = 3, rows: int = 45, trace: str | None = None
) -> None:
    """Profile `n_steps` calls of `step` and write the kernels, by total device time, to `path`
    (and the Chrome trace to `trace`, for `trace_summary.py`: where the host and the GPU wait)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(n_steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=rows,
                                      max_name_column_width=90)
    with open(path, "w") as f:
        f.write(f"{n_steps} steps\n{table}\n")
    if trace:
        prof.export_chrome_trace(trace)


def write_host_table(path: str, fn: Callable[[], object], rows: int = 40) -> None:
    """Run `fn` once under cProfile and write its functions, by own time, to `path` (the time a
    function spends waiting for the device, e.g. in `.tolist()`, shows as its own time)."""
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(rows)
    with open(path, "w") as f:
        f.write(out.getvalue())
