"""Where training numbers go: metrics.jsonl (always), TensorBoard, W&B, and the end-of-run plots.

Every record is one JSON line with a `kind` (`run`, `train`, `eval`, `skip`) and a `step`, so the
plots, a notebook or a resumed run all read the same file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
from pathlib import Path
from typing import Any

import torch

from dsv3.config import ConfigError, TrainConfig

__all__ = [
    "MetricsLogger",
    "read_metrics",
    "truncate_metrics",
    "expert_load_stats",
    "peak_memory",
    "gpu_peak_flops",
    "format_progress",
    "format_eval",
    "plot_run",
]

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"

# Dense bf16 tensor-core peak per GPU (vendor data sheets, SXM parts), the MFU denominator.
_PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def gpu_peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of the GPU running the job; None on CPU or an unknown GPU (no MFU then)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _PEAK_BF16_FLOPS.items() if k in name), None)


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak GPU memory allocated (CUDA) and the process's peak resident set size, in GB."""
    out = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}  # Linux: KiB
    if device.type == "cuda":
        out["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return out


def expert_load_stats(loads: torch.Tensor, biases: torch.Tensor | None) -> dict[str, Any]:
    """Per MoE layer: tokens per expert, max/mean imbalance, normalised load entropy, bias values.

    `loads` is (layers, experts) of routed-token counts. The entropy of the load distribution is
    divided by log(experts): 1.0 is a perfectly even load, 0.0 all tokens on one expert.
    """
    loads = loads.double()
    ran = (loads.sum(dim=1) > 0).tolist()  # MTP layers see no token when the MTP loss is off
    mean = loads.mean(dim=1).clamp_min(1e-9)
    frac = loads / loads.sum(dim=1, keepdim=True).clamp_min(1e-9)
    entropy = -(frac * frac.clamp_min(1e-12).log()).sum(dim=1) / math.log(loads.shape[1])
    imbalance = (loads.max(dim=1).values / mean).tolist()
    out: dict[str, Any] = {
        "expert_load": loads.long().tolist(),
        "imbalance": [v if r else None for v, r in zip(imbalance, ran, strict=True)],
        "load_entropy": [v if r else None for v, r in zip(entropy.tolist(), ran, strict=True)],
    }
    if any(ran):
        out["imbalance_max"] = max(v for v in out["imbalance"] if v is not None)
    if biases is not None:
        out["expert_bias"] = biases.double().tolist()
    return out


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
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in kept:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _fmt_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:.0f}"


def format_progress(r: dict[str, Any], total_steps: int) -> str:
    """One rich-markup line for a `train` record; `loss` is the LM loss, comparable with validation."""
    parts = [
        f"[bold]step {r['step']:>{len(str(total_steps))}}/{total_steps}[/bold]",
        f"loss [cyan]{r['lm_loss']:.4f}[/cyan]",
    ]
    if r.get("mtp_loss"):
        parts.append(f"λ·mtp {r['mtp_loss']:.3f}")
    parts += [
        f"lr {r['lr']:.2e}",
        f"tokens {_fmt_count(r['tokens'])}",
        f"{_fmt_count(r['tokens_per_s'])} tok/s",
    ]
    if r.get("mfu") is not None:
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    if "imbalance_max" in r:
        parts.append(f"load max/mean {r['imbalance_max']:.2f}")
    parts.append(f"ETA {_fmt_duration(r['eta_s'])}")
    return " │ ".join(parts)


def format_eval(r: dict[str, Any]) -> str:
    """One rich-markup line for an `eval` record, with the unigram baseline beside it."""
    line = f"[bold green]eval[/bold green] step {r['step']} │ val loss {r['val_loss']:.4f}"
    line += f" │ ppl {r['val_ppl']:.1f}"
    if r.get("unigram_loss") is not None:
        line += f" │ unigram baseline {r['unigram_loss']:.4f} (ppl {r['unigram_ppl']:.1f})"
    return line


def plot_run(output_dir: Path) -> list[Path]:
    """Write loss_curve.png and expert_load.png from metrics.jsonl; return the files written."""
    import matplotlib

    matplotlib.use("Agg")
    output_dir = Path(output_dir)
    records = read_metrics(output_dir / METRICS_FILE)
    written = [
        _plot_loss(records, output_dir / "loss_curve.png"),
        _plot_expert_load(records, output_dir / "expert_load.png"),
    ]
    return [p for p in written if p is not None]


def _plot_loss(records: list[dict[str, Any]], path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([r["step"] for r in train], [r["lm_loss"] for r in train], label="train LM loss", lw=1)
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation loss")
        if evals[-1].get("unigram_loss") is not None:
            ax.axhline(evals[-1]["unigram_loss"], ls="--", c="gray", label="unigram baseline")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)
    return path


def _plot_expert_load(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Heatmap: one row per (MoE layer, expert), one column per logged step, colour = load / mean."""
    import matplotlib.pyplot as plt
    import numpy as np

    loads = [r for r in records if r.get("kind") == "train" and "expert_load" in r]
    if not loads:
        return None
    counts = np.array([r["expert_load"] for r in loads], dtype=np.float64).transpose(1, 2, 0)  # (L, E, t)
    runs = [r for r in records if r.get("kind") == "run" and r.get("moe_layers")]
    names = runs[-1]["moe_layers"] if runs else [f"MoE layer {i}" for i in range(len(counts))]
    ran = counts.sum(axis=(1, 2)) > 0  # the MTP layers of a run without MTP loss see no token
    counts, names = counts[ran], [n.removesuffix(".mlp") for n, r in zip(names, ran, strict=False) if r]
    if not len(counts):
        return None
    share = counts / np.clip(counts.mean(axis=1, keepdims=True), 1e-9, None)
    n_layers, n_experts, _ = share.shape
    rows = n_layers * n_experts
    fig, ax = plt.subplots(figsize=(9, min(1.2 + 0.22 * rows, 14)))
    im = ax.imshow(
        share.reshape(rows, -1), aspect="auto", interpolation="nearest", cmap="magma",
        extent=(loads[0]["step"], loads[-1]["step"], rows, 0),
    )
    for i in range(1, n_layers):
        ax.axhline(i * n_experts, c="white", lw=1)
    ax.set_yticks([i * n_experts + n_experts / 2 for i in range(n_layers)])
    ax.set_yticklabels(names)
    ax.set(xlabel="step", title="expert load (tokens / mean tokens per expert; 1 = even)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)
    return path


def _save_fig(fig: Any, path: Path) -> Path:
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, path)
    return path
