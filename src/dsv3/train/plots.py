"""The end-of-run plots, drawn from metrics.jsonl: the loss curve, and the expert load (a heatmap per
expert, the max/mean load per MoE layer under it with the stretches where routing stayed collapsed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dsv3.io import atomic_open
from dsv3.train.metrics import COLLAPSE_STEPS, CollapseMonitor
from dsv3.train.sinks import METRICS_FILE, read_metrics

__all__ = ["plot_run"]


def plot_run(output_dir: Path, collapse_steps: int = COLLAPSE_STEPS) -> list[Path]:
    """Write loss_curve.png and expert_load.png from metrics.jsonl; return the files written.
    `collapse_steps`: how long a layer must stay collapsed to be marked (the trainer's warning rule)."""
    import matplotlib

    matplotlib.use("Agg")
    output_dir = Path(output_dir)
    records = read_metrics(output_dir / METRICS_FILE)
    written = [
        _plot_loss(records, output_dir / "loss_curve.png"),
        _plot_expert_load(records, output_dir / "expert_load.png", collapse_steps),
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


def _plot_expert_load(records: list[dict[str, Any]], path: Path, collapse_steps: int) -> Path | None:
    """Top: one row per (MoE layer, expert), one column per logged step, colour = load / mean. Bottom: each
    layer's max/mean load, the collapse threshold, and shaded where a layer stayed collapsed (as the
    trainer's warning counts it, on the logged steps)."""
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
    share = counts / np.clip(counts.mean(axis=1, keepdims=True), 1e-9, None)  # (L, E, t)
    n_layers, n_experts, _ = share.shape
    steps = [r["step"] for r in loads]
    monitor = CollapseMonitor(names, min_steps=collapse_steps)
    for step, s in zip(steps, share.max(axis=1).T, strict=True):
        monitor.update(step, s.tolist(), 0.0)

    rows = n_layers * n_experts
    heat = min(max(rows * 0.22, 1.5), 10.0)  # inches: many experts share it; the panel below keeps its own
    fig, (ax, ax_imb) = plt.subplots(
        2, 1, sharex=True, figsize=(9, heat + 4.3), layout="constrained",
        gridspec_kw={"height_ratios": [heat, 3.5]},
    )
    im = ax.imshow(
        share.reshape(rows, -1), aspect="auto", interpolation="nearest", cmap="magma",
        extent=(steps[0], steps[-1], rows, 0),
    )
    for i in range(1, n_layers):
        ax.axhline(i * n_experts, c="white", lw=1)
    ax.set_yticks([i * n_experts + n_experts / 2 for i in range(n_layers)])
    ax.set_yticklabels(names)
    ax.set(title="expert load (tokens / mean tokens per expert; 1 = even)")
    fig.colorbar(im, ax=[ax, ax_imb], fraction=0.03, pad=0.02, label="load / mean")

    for name, series, spans in zip(names, share.max(axis=1), monitor.stretches(), strict=True):
        (line,) = ax_imb.plot(steps, series, lw=1, label=name)
        for first, last in spans:
            ax_imb.axvspan(first, last, color=line.get_color(), alpha=0.12)
    limit = monitor.threshold
    ax_imb.axhline(limit, ls="--", c="gray", lw=1, label=f"collapse threshold {limit:g}")
    if (warned := monitor.warned_at) is not None:
        ax_imb.axvline(warned, c="black", lw=1.5, label=f"collapse warning (step {warned})")
    ax_imb.set(xlabel="step", ylabel="max / mean load", ylim=(1, None))
    title = f"busiest expert per layer; shaded: above {limit:g} for {monitor.min_steps}+ steps in a row"
    ax_imb.set_title(title, fontsize=9)
    ax_imb.grid(alpha=0.3)
    ax_imb.legend(fontsize=7, ncol=2 if n_layers < 6 else 4, loc="upper right")
    _save_fig(fig, path)
    plt.close(fig)
    return path


def _save_fig(fig: Any, path: Path) -> Path:
    with atomic_open(path) as f:
        fig.savefig(f, dpi=110, format="png")
    return path
