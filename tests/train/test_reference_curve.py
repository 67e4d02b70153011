"""Training follows the stored reference curve (tests/fixtures/reference_curve.json), so a change that
silently hurts training, or routing balance, fails here.

The tolerances come from measurements (docs/training.md): scaling every initial weight by
(1 + 1e-6·noise), more than the rounding differences between CPUs, moved the per-step LM loss by
0.0013-0.0017 nats on average, a 20-step window by at most 0.0026, and the last half's mean max/mean
expert load by at most 0.18. Changes that hurt training move them by more: the old balance defaults
(γ = 0.001, α = 0) by 0.018 nats and +2.2 in load, no MTP loss by 0.013, no weight decay by 0.010, no
gradient clipping by 0.034.
"""

from __future__ import annotations

import json
import logging

import numpy as np

from tests.train.make_reference_curve import CURVE_FILE, reference_run

LOSS_TOLERANCE = 0.004  # mean |Δ LM loss| per step, nats
WINDOW, WINDOW_TOLERANCE = 20, 0.01  # |Δ| of the mean LM loss of each 20-step window, nats
LOAD_TOLERANCE = 0.35  # |Δ| of the mean max/mean expert load over the last half of the run
REGENERATE = (
    "if the change is meant to move training, regenerate the curve with "
    "`PYTHONPATH=src python -m tests.train.make_reference_curve` and say why in the commit message"
)


def test_training_follows_the_reference_curve(tmp_path, caplog):
    ref = json.loads(CURVE_FILE.read_text(encoding="utf-8"))
    with caplog.at_level(logging.WARNING, logger="dsv3.train.trainer"):
        got = reference_run(tmp_path)
    assert got["steps"] == ref["steps"]

    loss, ref_loss = np.array(got["lm_loss"]), np.array(ref["lm_loss"])
    diff = np.abs(loss - ref_loss)
    worst = int(diff.argmax())
    assert diff.mean() <= LOSS_TOLERANCE, (
        f"per-step LM loss is {diff.mean():.4f} nats off the reference on average (tolerance "
        f"{LOSS_TOLERANCE}); worst at step {got['steps'][worst]}: {loss[worst]:.4f}, reference "
        f"{ref_loss[worst]:.4f}; " + REGENERATE
    )
    windows = np.abs(loss.reshape(-1, WINDOW).mean(1) - ref_loss.reshape(-1, WINDOW).mean(1))
    assert windows.max() <= WINDOW_TOLERANCE, (
        f"{WINDOW}-step mean LM loss off the reference by {np.round(windows, 4).tolist()}; " + REGENERATE
    )

    half = len(loss) // 2
    load, ref_load = np.mean(got["imbalance_max"][half:]), np.mean(ref["imbalance_max"][half:])
    assert abs(load - ref_load) <= LOAD_TOLERANCE, (
        f"max/mean expert load over the last {len(loss) - half} steps is {load:.2f}, the reference "
        f"{ref_load:.2f}; " + REGENERATE
    )
    # What the curve shows, as a property of the run: every token picks the same experts in the first
    # steps (of at most E/k = 4, docs/training.md explains why), and the default balancing undoes it.
    assert max(got["imbalance_max"][:20]) > 3.5
    assert load < 2.0
    assert not [r for r in caplog.records if "routing collapsed" in r.getMessage()]

