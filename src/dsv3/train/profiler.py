"""`train.profile_steps`: torch.profiler around a window of training steps, on every rank.

Why a window: the first steps compile, warm up allocators and NCCL, and a whole run's trace would be
gigabytes. Each rank writes `profile/rank<r>.txt` (the kernels and operators by device time, then by
host time: what to optimise, and where the host stalls the GPU) and `profile/rank<r>.json` (a Chrome
trace for chrome://tracing or Perfetto). Both are written to a temporary name and renamed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from dsv3.io import commit, temp_path, write_text_atomic

__all__ = ["StepProfiler"]


class StepProfiler:
    """Records steps [first, first + steps) (1-based, as the trainer counts); a no-op when steps = 0."""

    def __init__(self, out: Path, rank: int, first: int, steps: int, device: torch.device) -> None:
        self.out, self.rank, self.first, self.last = out / "profile", rank, first, first + steps - 1
        self.enabled = steps > 0
        activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self.device_time = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        self.prof = profile(activities=activities, record_shapes=True) if self.enabled else None
        self.running = False

    def before_step(self, step: int) -> None:
        """Call with the number of the step about to run."""
        if self.enabled and step == self.first and not self.running:
            self.prof.__enter__()
            self.running = True

    def after_step(self, step: int) -> None:
        """Call with the number of the step just queued; ends the window after its last step."""
        if self.running and step >= self.last:
            self.stop()

    def stop(self) -> None:
        if not self.running:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the window's kernels belong to it
        self.prof.__exit__(None, None, None)
        self.running, self.enabled = False, False
        self.out.mkdir(parents=True, exist_ok=True)
        averages = self.prof.key_averages()
        steps = self.last - self.first + 1
        table = "\n\n".join(
            f"# steps {self.first}-{self.last} ({steps}), rank {self.rank}, sorted by {key}\n"
            + averages.table(sort_by=key, row_limit=40, max_name_column_width=70)
            for key in (self.device_time, "self_cpu_time_total")
        )
        write_text_atomic(self.out / f"rank{self.rank}.txt", table)
        trace = self.out / f"rank{self.rank}.json"
        tmp = temp_path(trace)
        self.prof.export_chrome_trace(str(tmp))  # the profiler writes the file itself
        commit(tmp, trace)
