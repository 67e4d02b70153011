"""LR schedules hit their defining points; weight decay skips norms and biases; auto γ."""

import math

import pytest
import torch
from torch import nn

from dsv3.config import TrainConfig
from dsv3.train.optim import (
    GAMMA_PER_LR,
    bias_update_speed,
    build_optimizer,
    describe_bias_update_speed,
    lr_at,
    param_groups,
)


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    return TrainConfig(**{**base, **kw})


def test_warmup_is_linear_and_reaches_peak():
    cfg = _cfg(schedule="cosine")
    assert [lr_at(s, cfg) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])


def test_cosine_ends_at_min_lr_and_passes_midpoint():
    cfg = _cfg(schedule="cosine")
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert lr_at(500, cfg) == pytest.approx(0.1)  # past the end stays at the floor
    values = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_constant_and_wsd():
    assert all(lr_at(s, _cfg(schedule="constant")) == 1.0 for s in range(10, 200))
    wsd = _cfg(schedule="wsd", decay_fraction=0.2)
    assert lr_at(79, wsd) == 1.0  # stable until the last 20 steps
    assert lr_at(90, wsd) == pytest.approx(0.55)
    assert lr_at(100, wsd) == pytest.approx(0.1)


def test_no_warmup():
    cfg = _cfg(warmup_steps=0, schedule="cosine")
    assert lr_at(0, cfg) == pytest.approx(1.0)
    assert math.isfinite(lr_at(100, cfg))


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.experts = nn.Parameter(torch.zeros(3, 4, 4))
        self.frozen = nn.Parameter(torch.zeros(4, 4), requires_grad=False)
        self.register_buffer("bias_buffer", torch.zeros(4))


def test_weight_decay_only_on_matrices():
    model = _Toy()
    decay, plain = param_groups(model, 0.1)
    assert {id(p) for p in decay["params"]} == {id(model.proj.weight), id(model.experts)}
    no_decay = {id(model.proj.bias), id(model.norm.weight), id(model.norm.bias)}
    assert {id(p) for p in plain["params"]} == no_decay
    assert decay["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    opt = build_optimizer(model, _cfg(weight_decay=0.1))
    assert len(opt.param_groups) == 2 and opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_auto_bias_speed_is_the_papers_gamma_at_the_papers_lr():
    paper = TrainConfig(lr=2.2e-4, min_lr=2.2e-5, warmup_steps=2000, steps=61200)  # DeepSeek-V3 §4.2
    assert [bias_update_speed(s, paper) for s in (0, 1000, 2000)] == pytest.approx([0.001] * 3)
    demo = _cfg(lr=2e-3, min_lr=2e-4)  # warmup 10 of 100 steps, cosine
    for step in (0, 5, 9):  # held at the peak through warmup: 0.0091, 10x the paper's
        assert bias_update_speed(step, demo) == pytest.approx(2e-3 * 0.001 / 2.2e-4)
    for step in (10, 55, 99):  # then it follows the learning rate down
        assert bias_update_speed(step, demo) == pytest.approx(lr_at(step, demo) * GAMMA_PER_LR)
    assert describe_bias_update_speed(demo) == {
        "rule": "auto", "gamma_per_lr": GAMMA_PER_LR, "gamma_first": pytest.approx(2e-3 * GAMMA_PER_LR),
        "gamma_last": pytest.approx(lr_at(99, demo) * GAMMA_PER_LR),
    }


def test_a_number_is_used_as_is():
    cfg = _cfg(bias_update_speed=0.01)
    assert {bias_update_speed(s, cfg) for s in (0, 50, 99)} == {0.01}
    assert describe_bias_update_speed(cfg) == {"rule": "constant", "gamma": 0.01}
