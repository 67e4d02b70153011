"""LR schedules hit their defining points; weight decay skips norms and biases; auto γ."""

import copy
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


# --- AdamW with bfloat16 moments (DeepSeek-V3's optimizer states) --------------------------------


def _pair(state_dtype: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 4))
    cfg = _cfg(lr=1e-2, warmup_steps=1, optimizer_state_dtype=state_dtype, beta2=0.95)
    return model, build_optimizer(model, cfg, fused=False)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x, y = torch.randn(64, 16, generator=gen), torch.randn(64, 4, generator=gen)
        loss = (model(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_the_update_with_float32_moments_is_torch_adamw():
    """The one update function, fed float32 moments, computes torch's AdamW (decoupled decay, bias
    corrections) to float rounding: only the storage of the moments differs in MixedAdamW."""
    from dsv3.train.adamw_mixed import adamw_update

    torch.manual_seed(0)
    start = [torch.randn(5, 7), torch.randn(3)]
    ref = [p.clone().requires_grad_() for p in start]
    groups = [{"params": ref[:1], "weight_decay": 0.1}, {"params": ref[1:], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=True)
    mine = [p.clone() for p in start]
    moments = [[torch.zeros_like(p) for p in start] for _ in range(2)]
    steps = [torch.zeros(()) for _ in start]
    for _ in range(5):
        grads = [torch.randn_like(p) for p in start]
        for r, g in zip(ref, grads, strict=True):
            r.grad = g.clone()
        opt.step()
        for i, decay in ((0, 0.1), (1, 0.0)):
            adamw_update([mine[i]], [grads[i]], [moments[0][i]], [moments[1][i]], [steps[i]],
                         torch.tensor(1e-2), torch.tensor(0.0), torch.tensor(1.0), 0.9, 0.95, 1e-8, decay)
    assert max((a - b.detach()).abs().max().item() for a, b in zip(mine, ref, strict=True)) < 1e-6


def test_bfloat16_moments_halve_the_state_and_train_like_float32():
    model, opt = _pair("bfloat16")
    losses = _train(model, opt, 30)
    ref_model, ref_opt = _pair("float32")
    reference = _train(ref_model, ref_opt, 30)
    state = opt.state[model[0].weight]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    assert state["step"].item() == 30
    assert losses[-1] < 0.8 * losses[0]  # it learns
    assert max(abs(a - b) / b for a, b in zip(losses, reference, strict=True)) < 2e-3  # measured 1.4e-4


def test_bfloat16_moments_skip_a_flagged_step_on_the_device():
    model, opt = _pair("bfloat16")
    _train(model, opt, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
    opt.found_inf = torch.ones(())
    _train(model, opt, 1, seed=9)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(state[k], v) for k, v in opt.state[model[0].weight].items())
    opt.found_inf = torch.zeros(())
    _train(model, opt, 1, seed=9)
    assert not torch.equal(before["0.weight"], model[0].weight) and opt.state[model[0].weight]["step"] == 4


def test_bfloat16_moments_resume_from_a_state_dict_exactly():
    """load_state_dict casts the moments to the parameters' float32: the next step stores them in
    bfloat16 again (exactly: bf16 → fp32 → bf16), so a resumed optimizer continues bit for bit."""
    model, opt = _pair("bfloat16")
    _train(model, opt, 5)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())  # state_dict() holds the live tensors
    straight = _train(model, opt, 5, seed=2)
    again, opt2 = _pair("bfloat16")
    again.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    assert _train(again, opt2, 5, seed=2) == straight
    assert opt2.state[again[0].weight]["exp_avg"].dtype == torch.bfloat16


def test_a_failing_compile_of_the_bf16_update_warns_once_and_updates_eagerly(monkeypatch, caplog):
    from dsv3.compiling import compiled_or_eager
    from dsv3.train import adamw_mixed

    def broken_compile(fn, **_):
        def run(*args):
            raise RuntimeError("backend failed")

        return run

    monkeypatch.setattr(adamw_mixed.torch, "compile", broken_compile)
    update = compiled_or_eager(adamw_mixed.adamw_update, "MixedAdamW's update")
    p, ref = torch.ones(4), torch.ones(4)
    states = [[torch.zeros(4, dtype=torch.bfloat16) for _ in range(2)] for _ in range(2)]
    steps = [torch.zeros(()), torch.zeros(())]
    args = (torch.tensor(0.1), torch.tensor(0.0), torch.tensor(1.0), 0.9, 0.95, 1e-8, 0.0)
    with caplog.at_level("WARNING"):
        for _ in range(2):
            update([p], [torch.ones(4)], [states[0][0]], [states[0][1]], [steps[0]], *args)
            adamw_mixed.adamw_update([ref], [torch.ones(4)], [states[1][0]], [states[1][1]], [steps[1]],
                                     *args)
    assert torch.equal(p, ref) and not torch.equal(p, torch.ones(4))
    assert sum("torch.compile failed: backend failed" in r.message for r in caplog.records) == 1


# --- bf16 weights with float32 masters (train.param_dtype) -----------------------------------------


def test_masters_take_float32_adamw_steps_and_the_weights_are_their_rounding():
    """With float32 `masters` of bf16 weights, MixedAdamW steps the masters exactly as torch's AdamW
    steps float32 weights fed the same gradients, and each weight is its master rounded to bf16."""
    from dsv3.train.master_weights import keep_master_weights

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 4))
    reference = copy.deepcopy(model)
    masters = keep_master_weights(model)
    cfg = _cfg(lr=1e-2, warmup_steps=1, beta2=0.95, optimizer_state_dtype="float32")
    opt = build_optimizer(model, cfg, fused=False, masters=masters)
    ref_opt = build_optimizer(reference, cfg, fused=False)
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        for p, r in zip(model.parameters(), reference.parameters(), strict=True):
            g = torch.randn(p.shape, generator=gen)
            p.grad, r.grad = g.bfloat16(), g.bfloat16().float()  # the gradient a bf16 backward gives
        opt.step()
        ref_opt.step()
    for p, r in zip(model.parameters(), reference.parameters(), strict=True):
        assert p.dtype == torch.bfloat16 and masters[p].dtype == torch.float32
        torch.testing.assert_close(masters[p], r.detach(), rtol=0, atol=1e-6)
        assert torch.equal(p, masters[p].bfloat16())
    assert opt.state[model[0].weight]["exp_avg"].dtype == torch.float32  # as asked


def test_auto_moments_are_bf16_exactly_with_bf16_weights():
    """`optimizer_state_dtype: auto` (the default): bf16 moments beside float32 masters, float32
    moments for float32 weights; the config's rule says the same for one GPU, several, and a CPU."""
    from dsv3.config import TrainConfig
    from dsv3.train.master_weights import keep_master_weights

    model = nn.Sequential(nn.Linear(8, 8))
    plain = copy.deepcopy(model)
    opt = build_optimizer(model, _cfg(), fused=False, masters=keep_master_weights(model))
    opt_plain = build_optimizer(plain, _cfg(), fused=False)
    for m, o in ((model, opt), (plain, opt_plain)):
        m[0].weight.grad = torch.ones_like(m[0].weight)
        m[0].bias.grad = torch.ones_like(m[0].bias)
        o.step()
    assert opt.state[model[0].weight]["exp_avg"].dtype == torch.bfloat16
    assert opt_plain.state[plain[0].weight]["exp_avg"].dtype == torch.float32
    auto = TrainConfig()
    assert auto.bf16_moments("cuda", 1) and not auto.bf16_moments("cuda", 2)
    assert not auto.bf16_moments("cpu", 1)
    assert not TrainConfig(optimizer_state_dtype="float32").bf16_moments("cuda", 1)
    assert TrainConfig(optimizer_state_dtype="bfloat16").bf16_moments("cpu", 4)


def test_a_model_with_masters_gives_them_as_its_state_dict():
    """What checkpoints save: the float32 masters, never their bf16 rounding; buffers keep their dtype,
    and keep_vars still hands out the live parameters."""
    from dsv3.train.master_weights import keep_master_weights

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masters = keep_master_weights(model)
    assert model[0].weight.dtype == torch.bfloat16 and model[1].running_mean.dtype == torch.float32
    state = model.state_dict()
    assert all(torch.equal(state[k], before[k]) and state[k].dtype == before[k].dtype for k in before)
    with torch.no_grad():
        masters[model[0].weight].add_(1.0)
    assert torch.equal(model.state_dict()["0.weight"], before["0.weight"] + 1.0)
    assert model.state_dict(keep_vars=True)["0.weight"] is model[0].weight


def test_micro_batch_gradients_of_bf16_weights_add_up_in_float32():
    """Float32GradAccumulation takes each micro-batch's bf16 gradient as the backward makes it and sums
    in float32 (`.grad` stays free); MixedAdamW steps on those sums: the masters move as torch's float32
    AdamW fed the same sums."""
    from dsv3.train.master_weights import Float32GradAccumulation, keep_master_weights

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    reference = copy.deepcopy(model)
    masters = keep_master_weights(model)
    sums = Float32GradAccumulation(list(masters))
    cfg = _cfg(lr=1e-2, warmup_steps=1, optimizer_state_dtype="float32")  # torch's AdamW's
    opt = build_optimizer(model, cfg, fused=False, masters=masters)
    opt.grads = sums.grads
    ref_opt = build_optimizer(reference, cfg, fused=False)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        expected = {p: torch.zeros(p.shape) for p in model.parameters()}
        for _ in range(4):  # micro-batches
            x = torch.randn(8, 16, generator=gen).bfloat16()
            model(x).square().mean().backward()
            assert all(p.grad is None for p in model.parameters())
            # the bf16 gradient of this micro-batch alone, as the hook received it
            probe = copy.deepcopy(model)
            probe(x).square().mean().backward()
            for p, q in zip(model.parameters(), probe.parameters(), strict=True):
                expected[p] += q.grad.float()
        for p in model.parameters():
            assert sums.grads[p].dtype == torch.float32 and torch.equal(sums.grads[p], expected[p])
        for p, r in zip(model.parameters(), reference.parameters(), strict=True):
            r.grad = sums.grads[p].clone()
        opt.step()
        ref_opt.step()
        sums.reset()
    for p, r in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(masters[p], r.detach(), rtol=0, atol=1e-6)
