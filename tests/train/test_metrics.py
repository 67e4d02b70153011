"""Routing collapse: one warning with numbers once a layer stays collapsed, and the stretches to plot."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from dsv3.train.metrics import CollapseMonitor, expert_load_stats
from dsv3.train.plots import plot_run
from dsv3.train.trainer import Trainer
from tests.conftest import micro_run

NAMES = ["model.layers.1.mlp", "model.layers.2.mlp"]


def _feed(monitor: CollapseMonitor, rows: list[list[float | None]], first_step: int = 1) -> list[str]:
    warnings = []
    for step, row in enumerate(rows, start=first_step):
        if (w := monitor.update(step, row, gamma=0.0045)) is not None:
            warnings.append((step, w))
    return warnings


def test_warns_once_when_a_layer_stays_above_the_threshold():
    monitor = CollapseMonitor(NAMES, max_imbalance=4.0, threshold=2.0, min_steps=5)
    # layer 2 is collapsed from step 3 on; layer 1 has a 3-step blip (steps 2-4) that must not count
    rows = [[1.2, 1.1], [2.5, 1.3], [2.6, 3.9], [2.4, 4.0], [1.5, 4.0], [1.4, 3.8], [1.3, 4.0], [1.2, 4.0]]
    warnings = _feed(monitor, rows)
    assert [step for step, _ in warnings] == [7]  # steps 3..7 = 5 in a row; once only
    text = warnings[0][1]
    assert "model.layers.2.mlp" in text and "5 steps in a row (steps 3-7)" in text
    assert "4.00" in text and "at most 4.00" in text and "0.0045" in text and "bias_update_speed" in text
    assert monitor.warned_at == 7
    assert monitor.stretches() == [[], [(3, 8)]]  # the blip is shorter than min_steps


def test_value_at_the_threshold_and_missing_layers_do_not_count():
    monitor = CollapseMonitor(NAMES, threshold=2.0, min_steps=2)
    assert _feed(monitor, [[2.0, None], [2.0, None], [2.0, None]]) == []
    assert monitor.stretches() == [[], []]


def test_sparse_steps_count_the_span_they_cover():
    """The plot replays logged steps (every log_every-th): a stretch spans its first to last logged step."""
    monitor = CollapseMonitor(NAMES[:1], threshold=2.0, min_steps=100)
    steps = list(range(10, 301, 10))
    values = [3.0 if 50 <= s <= 150 else 1.1 for s in steps]  # 50..150: 101 steps
    for s, v in zip(steps, values, strict=True):
        monitor.update(s, [v], gamma=0.0)
    assert monitor.stretches() == [[(50, 150)]] and monitor.warned_at == 150


def test_expert_load_stats_imbalance_is_max_over_mean():
    loads = np.array([[10, 0, 30, 0], [5, 5, 5, 5], [0, 0, 0, 0]])
    stats = expert_load_stats(torch.tensor(loads), None)
    assert stats["imbalance"][:2] == pytest.approx([3.0, 1.0]) and stats["imbalance"][2] is None
    assert "ep_imbalance" not in stats


def test_expert_parallel_imbalance_is_the_busiest_ranks_share():
    """EP=2 over 4 experts: rank 0 holds experts 0-1, rank 1 experts 2-3; a layer that saw no token
    (an MTP depth without its loss) is left out."""
    loads = torch.tensor([[10, 0, 30, 0], [5, 5, 5, 5], [0, 0, 0, 0]])
    stats = expert_load_stats(loads, None, ep=2)
    assert stats["ep_imbalance_max"] == pytest.approx(1.5)  # ranks 10 and 30 against their mean 20
    assert stats["ep_imbalance"] == pytest.approx((1.5 + 1.0) / 2)


def test_trainer_warns_and_the_plot_marks_the_collapse(tmp_path, corpus_shards, caplog):
    """No balancing at all (γ = 0, α = 0): the micro model's routing collapses and stays so."""
    train_dir, _ = corpus_shards
    cfg = micro_run(tmp_path / "run", train_dir, None, "train.steps=40", "train.bias_update_speed=0",
                    "train.balance_alpha=0", "train.eval_every=40", "train.save_every=40")
    trainer = Trainer(cfg)
    trainer.collapse.min_steps = 20  # the default (100 steps) would outlast this test run
    with caplog.at_level(logging.WARNING, logger="dsv3.train.trainer"):
        trainer.fit()
    warnings = [r.getMessage() for r in caplog.records if "routing collapsed" in r.getMessage()]
    assert len(warnings) == 1 and "20 steps in a row" in warnings[0] and "at most 4.00" in warnings[0]

    # the plot replays the same rule on the logged steps (every step here): it marks the same step
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    run = next(r for r in records if r["kind"] == "run")
    assert run["bias_update_speed"] == {"rule": "constant", "gamma": 0.0}
    replay = CollapseMonitor(run["moe_layers"], min_steps=20)
    for r in records:
        if r["kind"] == "train":
            replay.update(r["step"], r["imbalance"], gamma=0.0)
    assert replay.warned_at == trainer.collapse.warned_at and any(replay.stretches())
    paths = plot_run(tmp_path / "run", collapse_steps=20)
    assert any(p.name == "expert_load.png" and p.stat().st_size > 1000 for p in paths)


def test_progress_line_shows_the_expert_parallel_imbalance_only_when_there_is_one():
    from dsv3.cli.train import format_progress

    record = {"step": 10, "lm_loss": 3.0, "lr": 1e-3, "tokens": 1000, "tokens_per_s": 500.0, "mfu": None,
              "eta_s": 60.0, "imbalance_max": 1.5}
    line = format_progress(record, 100)
    assert "load max/mean 1.50" in line and "ep rank" not in line
    record |= expert_load_stats(torch.tensor([[10, 0, 30, 0]]), None, ep=2)
    assert "ep rank max/mean 1.50" in format_progress(record, 100)
