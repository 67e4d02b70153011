"""Where training records go: metrics.jsonl (always), TensorBoard and W&B (optional).

Every record is one JSON line with a `kind` (`run`, `train`, `eval`, `skip`) and a `step`, so the
plots, a notebook or a resumed run all read the same file.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from dsv3.config import ConfigError, TrainConfig
from dsv3.io import atomic_open

__all__ = ["METRICS_FILE", "MetricsLogger", "read_metrics", "truncate_metrics"]

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    """Append records to metrics.jsonl and mirror their scalars to TensorBoard and W&B."""

    def __init__(
        self, output_dir: Path, cfg: TrainConfig, run_name: str, run_config: dict,
        resumed_at: int | None = None,
    ) -> None:
        self.path = Path(output_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (lives as long as the run)
        self._tb = None
        self._wandb = None
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("tensorboard is not installed (pip install tensorboard): metrics.jsonl only")
            else:
                # purge_step hides what an interrupted run logged past the checkpoint we resume from.
                self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"), purge_step=resumed_at)
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise ConfigError(
                    "train.wandb is on but wandb is not installed: "
                    "pip install 'dsv3[wandb]' (or --set train.wandb=false)"
                ) from None
            self._wandb = wandb.init(
                project=cfg.wandb_project, name=run_name, config=run_config, dir=str(output_dir),
                resume="allow",
            )

    def log(self, record: dict[str, Any]) -> None:
        record = _json_safe(record)
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        step = record.get("step", 0)
        scalars = {k: v for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        scalars.pop("step", None)
        prefix = record.get("kind", "train")
        for i, v in enumerate(record.get("imbalance", [])):
            if v is not None:
                scalars[f"imbalance/layer_{i}"] = v
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"{prefix}/{k}", v, step)
            if "expert_bias" in record:
                self._tb.add_histogram(f"{prefix}/expert_bias", torch.tensor(record["expert_bias"]), step)
            if "sample" in record:
                self._tb.add_text(f"{prefix}/sample", record["sample"], step)
        if self._wandb is not None:
            self._wandb.log({f"{prefix}/{k}": v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _json_safe(value: Any) -> Any:
    """NaN/inf (a skipped step's loss) become null: metrics.jsonl stays strict JSON for every reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a line cut off by a crash is skipped with a warning."""
    records = []
    if not Path(path).is_file():
        return records
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s:%d: skipping a malformed line (cut off by a crash?)", path, lineno)
    return records


def truncate_metrics(output_dir: Path, step: int) -> None:
    """On resume, drop records past the checkpoint's step so the log reads as one uninterrupted run."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    with atomic_open(path, "w") as f:
        for r in kept:
            f.write(json.dumps(r) + "\n")
