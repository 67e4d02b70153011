"""The router (selection, groups, bias), the grouped expert compute and the balancing rules."""

from __future__ import annotations

import pytest
import torch

from dsv3.model.moe import MoE, route, sequence_balance_loss
from dsv3.model.moe_ops import (
    expert_counts,
    expert_matmul,
    gather_rows,
    grouped_mm_supported,
    padded_expert_mm,
    pair_sum,
    sort_by_expert,
    sum_rows,
)
from tests.conftest import traced_ops


def _logits(n: int, e: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, e, generator=torch.Generator().manual_seed(seed))


def test_bias_changes_selection_but_not_combine_weights():
    logits = _logits(512, 16)
    bias = torch.zeros(16)
    bias[:4] = 1.0  # make experts 0-3 attractive
    _, w0, i0 = route(logits, torch.zeros(16), top_k=4, norm_topk_prob=False)
    scores, w1, i1 = route(logits, bias, top_k=4, norm_topk_prob=False)
    assert not torch.equal(i0.sort(-1).values, i1.sort(-1).values)  # selection moved
    assert (i1 < 4).float().mean() > (i0 < 4).float().mean()
    # the combine weights are the unbiased sigmoid scores of whatever was chosen
    assert torch.equal(w1, logits.sigmoid().gather(1, i1))
    assert torch.equal(scores, logits.sigmoid())


def test_weights_normalized_then_scaled():
    logits = _logits(64, 8)
    _, w, idx = route(logits, torch.zeros(8), top_k=3, norm_topk_prob=True, routed_scaling_factor=2.5)
    assert torch.allclose(w.sum(-1), torch.full((64,), 2.5))
    chosen = logits.sigmoid().gather(1, idx)
    assert torch.allclose(w, 2.5 * chosen / chosen.sum(-1, keepdim=True))


@pytest.mark.parametrize("n_group,topk_group,top_k", [(4, 2, 4), (8, 3, 6), (8, 1, 2)])
def test_group_limited_routing_stays_in_kept_groups(n_group, topk_group, top_k):
    E = 32
    logits = _logits(2048, E, seed=n_group)
    bias = 0.3 * torch.randn(E, generator=torch.Generator().manual_seed(7))
    _, _, idx = route(logits, bias, top_k, n_group, topk_group)
    # the kept groups, recomputed independently: ranked by the sum of each group's top-2 biased scores
    biased = (logits.sigmoid() + bias).view(-1, n_group, E // n_group)
    group_rank = biased.topk(2, dim=-1).values.sum(-1)  # (N, G)
    kept = group_rank.topk(topk_group, dim=-1).indices  # (N, topk_group)
    chosen_groups = idx // (E // n_group)
    assert torch.all((chosen_groups.unsqueeze(-1) == kept.unsqueeze(1)).any(-1))
    # and inside the kept groups, the choice is the plain top-k of the biased scores
    masked = torch.full_like(biased, float("-inf"))
    masked.scatter_(
        1,
        kept.unsqueeze(-1).expand(-1, -1, E // n_group),
        biased.gather(1, kept.unsqueeze(-1).expand(-1, -1, E // n_group)),
    )
    expected = masked.view(-1, E).topk(top_k, dim=-1).indices
    assert torch.equal(idx.sort(-1).values, expected.sort(-1).values)
    # without the group limit some tokens would have left the kept groups
    _, _, free = route(logits, bias, top_k)
    assert not torch.all((free // (E // n_group)).unsqueeze(-1).eq(kept.unsqueeze(1)).any(-1))


def test_bias_updates_move_skewed_load_toward_uniform(make_config):
    cfg = make_config(hidden_size=32, n_routed_experts=16, num_experts_per_tok=2, n_group=1, topk_group=1)
    moe = MoE(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.3, generator=gen)
        moe.gate.weight[:3] += 0.2  # three experts prefer most tokens
    x = torch.randn(1, 1024, 32, generator=gen) + 0.5

    def imbalance() -> float:
        with torch.no_grad():
            moe(x)
        load = moe.tokens_per_expert.float()
        assert load.sum() == x.shape[0] * x.shape[1] * 2
        return (load.max() / load.mean()).item()

    history = [imbalance()]
    for _ in range(150):
        moe.update_bias(gamma=0.002)
        history.append(imbalance())
    assert history[0] > 3.0 and history[-1] < 1.3, history[::25]
    assert moe.gate.e_score_correction_bias[:3].max() < 0 < moe.gate.e_score_correction_bias[3:].max()


def test_tokens_per_expert_and_sort_by_expert():
    idx = torch.tensor([[3, 1], [1, 0], [3, 2], [1, 3]])
    order, ends = sort_by_expert(idx, 5)
    flat = idx.flatten()
    assert torch.equal(flat[order], flat.sort(stable=True).values)
    assert ends.tolist() == [1, 4, 5, 8, 8]  # expert 4 gets nothing


@pytest.mark.parametrize("n_experts", [5, 256, 257, 40_000])
def test_sort_by_expert_narrow_keys_keep_the_stable_order(n_experts):
    """The sort runs on uint8/int16 keys where the ids fit: the same order as a stable int64 sort
    (pairs of one expert stay in token order), the largest id included."""
    g = torch.Generator().manual_seed(n_experts)
    idx = torch.randint(0, n_experts, (300, 4), generator=g)
    idx[0, 0] = n_experts - 1
    order, ends = sort_by_expert(idx, n_experts)
    flat = idx.flatten()
    assert torch.equal(order, flat.argsort(stable=True))
    assert torch.equal(ends, torch.bincount(flat, minlength=n_experts).cumsum(0))


def _per_expert_reference(x, w, ends):
    """The obvious loop, to check the vectorized paths against."""
    out, start = [], 0
    for e, end in enumerate(ends.tolist()):
        out.append(x[start:end] @ w[e].T)
        start = end
    return torch.cat(out)


@pytest.mark.parametrize("dims", [(16, 8), (13, 7)])  # aligned, and odd widths grouped_mm refuses
def test_padded_expert_mm_is_exact_with_grads(dims):
    d_in, d_out = dims
    gen = torch.Generator().manual_seed(0)
    ends = torch.tensor([3, 3, 9, 10])  # an empty expert in the middle
    x = torch.randn(10, d_in, generator=gen, requires_grad=True)
    w = torch.randn(4, d_out, d_in, generator=gen, requires_grad=True)
    g = torch.randn(10, d_out, generator=gen)
    y = padded_expert_mm(x, w, ends)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    ry = _per_expert_reference(x, w, ends)
    rgx, rgw = torch.autograd.grad(ry, (x, w), g)
    assert (
        torch.allclose(y, ry, atol=1e-6)
        and torch.allclose(gx, rgx, atol=1e-6)
        and torch.allclose(gw, rgw, atol=1e-6)
    )


@pytest.mark.skipif(not hasattr(torch.nn.functional, "grouped_mm"), reason="torch without grouped_mm")
def test_grouped_mm_path_matches_fallback_in_bf16():
    gen = torch.Generator().manual_seed(0)
    ends = torch.tensor([5, 5, 20, 32])
    x = torch.randn(32, 32, generator=gen).bfloat16().requires_grad_()
    w = torch.randn(4, 16, 32, generator=gen).bfloat16().requires_grad_()
    assert grouped_mm_supported(x, w) and not grouped_mm_supported(x.float(), w.float())
    g = torch.randn(32, 16, generator=gen).bfloat16()
    y = expert_matmul(x, w, ends)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    ry = padded_expert_mm(x, w, ends)
    rgx, rgw = torch.autograd.grad(ry, (x, w), g)
    for a, b in ((y, ry), (gx, rgx), (gw, rgw)):
        assert torch.allclose(a.float(), b.float(), atol=0.1, rtol=0.02)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # the padded fallback, grouped_mm
def test_rows_past_the_last_expert_touch_no_result_or_weight_gradient(dtype):
    """The all-gather expert dispatch feeds more rows than its experts take: the in-group outputs and
    the weight gradients equal those of the trimmed rows, whatever the extra rows hold (NaN here), and
    whatever the kernels leave in the extra output rows (their gradients are zero)."""
    gen = torch.Generator().manual_seed(0)
    ends = torch.tensor([5, 5, 20])  # 20 rows in 3 experts of 32 rows fed
    x = torch.randn(32, 32, generator=gen).to(dtype)
    x[20:] = float("nan")
    x.requires_grad_()
    w = torch.randn(3, 16, 32, generator=gen).to(dtype).requires_grad_()
    g = torch.randn(32, 16, generator=gen).to(dtype)
    g[20:] = 0  # the dispatcher masks the extra rows' output before it reaches a loss
    y = expert_matmul(x, w, ends)
    (gw,) = torch.autograd.grad(y, (w,), g)
    x_in = x.detach()[:20].clone().requires_grad_()
    ry = expert_matmul(x_in, w, ends)
    (rgw,) = torch.autograd.grad(ry, (w,), g[:20])
    assert torch.equal(y[:20], ry) and torch.equal(gw, rgw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # the padded fallback, grouped_mm
def test_no_rows_give_an_empty_product_and_zero_weight_gradients_compiled(dtype):
    """An expert-parallel rank none of whose experts got a token has no rows: compiled, grouped_mm's
    weight gradient got an empty operand with strides it refuses ("Invalid strides/sizes", seen
    training a collapsed router on 2 CPU ranks in bf16); every rank still needs its experts' gradient."""
    w = torch.randn(3, 16, 32).to(dtype).requires_grad_()
    x = torch.randn(0, 32).to(dtype).requires_grad_()
    ends = torch.zeros(3, dtype=torch.long)

    def step(x, w):
        return expert_matmul(x, w, ends).float().sum()

    torch.compile(step, dynamic=False)(x, w).backward()
    assert w.grad is not None and not w.grad.any() and x.grad.shape == (0, 32)


def test_moe_output_equals_per_token_reference(make_config):
    cfg = make_config(hidden_size=24, moe_intermediate_size=12)  # odd widths: the fallback path
    moe = MoE(cfg)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3, generator=gen)
        moe.gate.e_score_correction_bias.normal_(0, 0.3, generator=gen)
    x = torch.randn(2, 5, 24, generator=gen)
    y, aux = moe(x)
    assert aux is None
    flat = x.view(-1, 24)
    _, weights, idx = moe.gate(flat)
    expected = moe.shared_experts(flat)
    for t in range(flat.shape[0]):
        for slot in range(idx.shape[1]):
            e = idx[t, slot]
            gate, up = (moe.experts.gate_up_proj[e] @ flat[t]).chunk(2)
            expected[t] += weights[t, slot] * (
                moe.experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up)
            )
    assert torch.allclose(y.view(-1, 24), expected, atol=1e-5)
    assert torch.equal(moe.tokens_per_expert, torch.bincount(idx.flatten(), minlength=cfg.n_routed_experts))


def test_moe_gradients_equal_the_per_token_reference(make_config):
    """The combine weight applied inside the activation (`swiglu.weighted_swiglu`) and the plain sum into
    tokens (`sum_rows`) give the router, the experts and the input the gradients of Σ_k w·expert(x)."""
    cfg = make_config(hidden_size=24, moe_intermediate_size=12)
    moe = MoE(cfg).double()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3, generator=gen)
    x = torch.randn(2, 5, 24, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 5, 24, generator=gen, dtype=torch.float64)
    params = [x, moe.gate.weight, moe.experts.gate_up_proj, moe.experts.down_proj]

    (moe(x)[0] * g).sum().backward()
    got = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    flat = x.view(-1, 24)
    _, weights, idx = moe.gate(flat)
    out = moe.shared_experts(flat)
    rows = []
    for t in range(flat.shape[0]):
        row = out[t]
        for slot in range(idx.shape[1]):
            e = idx[t, slot]
            gate, up = (moe.experts.gate_up_proj[e] @ flat[t]).chunk(2)
            row = row + weights[t, slot] * (moe.experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up))
        rows.append(row)
    (torch.stack(rows).view_as(g) * g).sum().backward()
    for name, a, p in zip(["x", "router", "gate_up", "down"], got, params, strict=True):
        torch.testing.assert_close(a, p.grad, rtol=1e-10, atol=1e-10, msg=name)


def test_sum_rows_gradcheck():
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(6, generator=gen)  # 3 tokens × 2 slots in expert order
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(6))
    y = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y: sum_rows(y, inverse, order // 2, 2), (y,))
    want = torch.stack([y[inverse[2 * t]] + y[inverse[2 * t + 1]] for t in range(3)])
    torch.testing.assert_close(sum_rows(y, inverse, order // 2, 2), want)


def test_sequence_balance_loss():
    B, T, E, k = 2, 8, 4, 2
    # perfectly balanced routing with uniform scores: f_i = 1 and P_i = 1/E → loss 1
    idx = torch.arange(T * k).remainder(E).view(1, T, k).expand(B, T, k)
    assert torch.allclose(sequence_balance_loss(torch.full((B, T, E), 0.5), idx), torch.ones(B))
    # all tokens on experts 0 and 1, scores favouring them: the loss grows
    skew_idx = torch.tensor([0, 1]).expand(B, T, k)
    skew_scores = torch.tensor([0.9, 0.9, 0.1, 0.1]).expand(B, T, E)
    assert torch.all(sequence_balance_loss(skew_scores, skew_idx) > 1.5)


def test_balance_loss_trains_only_the_router(make_config):
    cfg = make_config()
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.1)
    _, aux = moe(torch.randn(2, 6, cfg.hidden_size), balance=True)
    aux.backward()
    assert moe.gate.weight.grad.abs().sum() > 0
    assert moe.experts.gate_up_proj.grad is None or moe.experts.gate_up_proj.grad.abs().sum() == 0


def test_router_bias_stays_float32_in_bf16_models(make_config):
    moe = MoE(make_config())
    moe.gate.e_score_correction_bias.fill_(0.123456789)
    moe.to(torch.bfloat16)
    assert moe.gate.weight.dtype == torch.bfloat16
    assert moe.gate.e_score_correction_bias.dtype == torch.float32
    assert moe.gate.e_score_correction_bias[0].item() == pytest.approx(0.123456789, abs=1e-8)
    moe.update_bias(1e-4, load=torch.arange(8.0))  # a step bf16 would have rounded away
    assert moe.gate.e_score_correction_bias[0].item() == pytest.approx(0.123456789 + 1e-4, abs=1e-8)


def test_gather_rows_in_bf16_equals_gathering_float32_rows_then_casting():
    """The experts' rows are gathered after the cast; values and the float32 gradient are unchanged."""
    torch.manual_seed(0)
    N, k, d = 7, 3, 16
    order = torch.randperm(N * k)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(N * k))
    x = torch.randn(N, d, requires_grad=True)
    g = torch.randn(N * k, d).to(torch.bfloat16)
    got = gather_rows(x, order // k, inverse, k, torch.bfloat16)
    (got.float() * g.float()).sum().backward()
    grad, x.grad = x.grad, None
    want = x.index_select(0, order // k).to(torch.bfloat16)
    (want.float() * g.float()).sum().backward()
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad, x.grad, rtol=1e-6, atol=1e-6)


def test_pair_sum_equals_the_dense_sum_with_grads():
    """Pairs in any order, some slots empty (their expert on another rank): same sums and gradients."""
    torch.manual_seed(1)
    M, k, d = 5, 4, 8
    present = torch.rand(M, k) < 0.6
    present[:, 0] = True
    where = present.view(-1).nonzero().squeeze(1)  # the pairs' row · k + slot
    by_pair = where[torch.randperm(where.numel())]  # any order, as sorting by expert gives
    y = torch.randn(by_pair.numel(), d, requires_grad=True)
    out = pair_sum(y, by_pair, M, k)
    g = torch.randn(M, d)
    (out * g).sum().backward()
    got = (out.detach(), y.grad)
    y.grad = None
    want = y.new_zeros(M * k, d).index_copy(0, by_pair, y).view(M, k, d).sum(1)  # every slot, empty ones 0
    (want * g).sum().backward()
    torch.testing.assert_close(got[0], want.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], y.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_few_tokens_compiled_without_gradients_index_the_expert_weights_for_the_grouped_result(
    make_config, dtype
):
    """A compiled decoding forward (no gradient, at most E/2 (token, slot) pairs) runs
    `gathered_expert_ffn`: no sort into expert order; its output and expert counts equal the grouped
    path's (the same forward with gradients on)."""
    cfg = make_config(hidden_size=32, moe_intermediate_size=16)  # 16-byte aligned: grouped_mm in bf16
    moe = MoE(cfg)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3, generator=gen)
    moe.to(dtype)
    x = torch.randn(1, 2, 32, generator=gen).to(dtype)  # 2 tokens × k=2 = 4 pairs = E/2
    grouped, _ = moe(x)
    grouped_counts = moe.tokens_per_expert.clone()
    with torch.no_grad():
        assert torch.searchsorted not in traced_ops(moe, x)  # indexed: nothing sorted by expert
        assert torch.searchsorted in traced_ops(moe, torch.randn(1, 3, 32).to(dtype))  # 6 pairs: grouped
        torch._dynamo.reset()
        gathered, _ = torch.compile(moe)(x)
    # float32: sums in another order (2.1e-6 seen); bf16: roundings Inductor keeps in float32, up to
    # ~0.5 % of the output's scale (both paths are that far from a float64 forward of the same weights)
    scale = grouped.detach().abs().max().item()
    rtol, atol = (1e-5, 1e-5) if dtype == torch.float32 else (2e-2, 1e-2 * scale)
    torch.testing.assert_close(gathered, grouped.detach(), rtol=rtol, atol=atol)
    assert torch.equal(moe.tokens_per_expert, grouped_counts)


def test_expert_counts_equal_bincount():
    idx = torch.tensor([[3, 1], [3, 0], [7, 3]])
    assert torch.equal(expert_counts(idx, 8), torch.bincount(idx.flatten(), minlength=8))
