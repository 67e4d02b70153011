"""The batched sampler against direct computations: filters, penalties, seeds, speculative acceptance."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from dsv3.infer.sampling import (
    SamplingParams,
    SamplingRow,
    _penalize,
    device_index,
    params_error,
    sample,
    uniform,
)

LOGITS = torch.tensor([2.0, 1.5, 0.8, -0.6, -3.0, 0.1])
N = 20_000  # draws per distribution: frequencies within ±0.015 of the probabilities


def _rows(params: SamplingParams, n: int = N, **kw) -> list[SamplingRow]:
    return [SamplingRow(params, seed=s, index=0, prompt=[0], output=[], **kw) for s in range(n)]


def _freq(params: SamplingParams, logits=LOGITS, **kw) -> torch.Tensor:
    out = sample(logits.expand(N, -1).clone(), _rows(params, **kw))
    return torch.bincount(torch.tensor(out.tokens), minlength=logits.numel()).float() / N


def test_params_validate_and_name_the_field():
    with pytest.raises(ValidationError) as err:
        SamplingParams(top_p=0.0)
    assert params_error(err.value)[0] == "top_p"
    for bad in ({"temperature": -1}, {"n": 0}, {"max_tokens": 0}, {"logprobs": 21}, {"stop": [""]},
                {"presence_penalty": 3}, {"min_tokens": 5, "max_tokens": 2}, {"stop_token_ids": [-1]},
                {"unknown": 1}):  # fmt: skip
        with pytest.raises(ValidationError):
            SamplingParams(**bad)
    assert SamplingParams(stop="###").stop == ("###",) and SamplingParams(stop=None).stop == ()


def test_uniform_draws_depend_only_on_seed_index_and_stream():
    u = [uniform(5, i) for i in range(20_000)]
    assert all(0 <= x < 1 for x in u) and abs(sum(u) / len(u) - 0.5) < 0.01
    assert uniform(5, 3) == uniform(5, 3) != uniform(5, 4)
    assert uniform(5, 3, 0) != uniform(5, 3, 1) and uniform(5, 3) != uniform(6, 3)
    assert 0 <= uniform(-1, 0) < 1 and 0 <= uniform(2**64 - 1, 2**40) < 1


def test_temperature_top_k_top_p_min_p_shape_the_distribution():
    probs = LOGITS.softmax(-1)
    for t in (0.5, 1.0, 2.0):
        torch.testing.assert_close(
            _freq(SamplingParams(temperature=t)), (LOGITS / t).softmax(-1), atol=0.015, rtol=0
        )

    def kept(mask: list[bool]) -> torch.Tensor:
        p = probs * torch.tensor(mask)
        return p / p.sum()

    cases = [  # (params, tokens kept); probs ≈ 0.47, 0.29, 0.14, 0.03, 0.00, 0.07
        (SamplingParams(top_k=2), [1, 1, 0, 0, 0, 0]),
        (SamplingParams(top_p=0.7), [1, 1, 0, 0, 0, 0]),  # the top two reach 0.76
        (SamplingParams(top_p=0.8), [1, 1, 1, 0, 0, 0]),
        (SamplingParams(min_p=0.2), [1, 1, 1, 0, 0, 0]),  # ≥ 0.2 × 0.47
        (SamplingParams(top_k=3, top_p=0.7), [1, 1, 0, 0, 0, 0]),
        (SamplingParams(top_k=4, min_p=0.1), [1, 1, 1, 0, 0, 1]),
    ]
    for params, mask in cases:
        torch.testing.assert_close(_freq(params), kept(mask), atol=0.015, rtol=0, msg=str(params))
    greedy = sample(LOGITS.expand(3, -1).clone(), _rows(SamplingParams(temperature=0), n=3))
    assert greedy.tokens == [0, 0, 0]


def test_penalties_follow_vllms_formulas():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    p = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    row = SamplingRow(p, seed=0, index=3, prompt=[1], output=[3, 3, 2])
    got = _penalize(logits.clone(), [row])[0]
    # repetition on prompt ∪ output {1, 2, 3}: positive ÷ 2, negative × 2; then output counts {3: 2, 2: 1}
    expected = torch.tensor([2.0, -2.0, 0.25 - 0.5 - 0.25, 1.5 - 0.5 - 0.5, -2.0])
    torch.testing.assert_close(got, expected)
    plain = SamplingRow(SamplingParams(), seed=0, index=3, prompt=[1], output=[3])
    assert torch.equal(_penalize(logits.clone(), [plain]), logits)  # no penalty asked: untouched
    # greedy after penalties: token 3 (3.0) loses to token 0 (2.0)
    assert sample(
        logits.clone(), [SamplingRow(p.model_copy(update={"temperature": 0}), 0, 3, [1], [3, 3, 2])]
    ).tokens == [0]


def test_logit_bias_is_added_to_the_raw_logits_before_penalties_and_sampling():
    """OpenAI's logit_bias: −100 bans a token, +100 forces it, a small bias reweights by e^bias; added
    before the penalties (vLLM's order); logprobs stay the model's own."""
    params = SamplingParams(logit_bias={"0": -100, 3: 1.5})  # JSON keys are strings: both accepted
    assert params.logit_bias == ((0, -100.0), (3, 1.5))
    biased = LOGITS.clone()
    biased[0] -= 100
    biased[3] += 1.5
    torch.testing.assert_close(_freq(params), biased.softmax(-1), atol=0.015, rtol=0)
    greedy = SamplingParams(temperature=0, logit_bias={4: 100}, logprobs=1)
    out = sample(LOGITS.expand(2, -1).clone(), _rows(greedy, n=2))
    assert out.tokens == [4, 4]  # the least likely token, forced
    assert out.logprobs[0] == pytest.approx(float(LOGITS.log_softmax(-1)[4]))  # raw, not biased
    # before the repetition penalty: token 1's 1.5 + 2 = 3.5 halves to 1.75 < 2.0 (after it would be
    # 0.75 + 2 = 2.75 and win)
    logits = torch.tensor([[2.0, 1.5, 0.0]])
    penalized = SamplingParams(temperature=0, repetition_penalty=2.0, logit_bias={1: 2.0})
    row = SamplingRow(penalized, 0, 0, [1], [])
    assert sample(logits.clone(), [row]).tokens == [0]
    plain = SamplingRow(SamplingParams(temperature=0), 0, 0, [1], [])
    both = sample(logits.expand(2, -1).clone(), [plain, row])
    assert both.tokens == [0, 0]  # each row its own bias: unbiased token 0 wins; biased after the penalty too
    forced = SamplingRow(SamplingParams(temperature=0, logit_bias={2: 3.0}), 0, 0, [1], [])
    assert sample(logits.expand(2, -1).clone(), [plain, forced]).tokens == [0, 2]
    for bad in ({"x": 1.0}, {5: 101.0}, {5: float("nan")}, {-1: 1.0}, {5: "big"}):
        with pytest.raises(ValidationError) as err:
            SamplingParams(logit_bias=bad)
        assert params_error(err.value)[0].startswith("logit_bias"), bad
    assert hash(params) == hash(SamplingParams(logit_bias={3: 1.5, 0: -100}))  # order-free, hashable


def test_banned_tokens_are_never_drawn():
    freq = _freq(SamplingParams(), banned=(0, 1))
    assert freq[0] == 0 and freq[1] == 0 and freq[2] > 0.3


def test_speculative_acceptance_keeps_the_target_distribution_and_each_rows_draw():
    """A draft (the draft model's argmax) is kept when the row's own draw is that token: the tokens
    are distributed as p, drafts are accepted at rate p(draft), and each seeded row draws the token
    it draws without a draft."""
    params = SamplingParams(temperature=0.8, top_k=5)
    logits = LOGITS
    p = (logits / 0.8).softmax(-1)
    p[p.argsort()[0]] = 0  # top_k=5 drops the least likely
    p /= p.sum()
    for draft in (0, 2, 4):
        out = sample(logits.expand(N, -1).clone(), _rows(params, draft=draft))
        freq = torch.bincount(torch.tensor(out.tokens), minlength=6).float() / N
        torch.testing.assert_close(freq, p, atol=0.015, rtol=0)
        assert abs(sum(out.accepted) / N - float(p[draft])) < 0.015
        assert all(a == (t == draft) for t, a in zip(out.tokens, out.accepted, strict=True))
        assert out.tokens == sample(logits.expand(N, -1).clone(), _rows(params)).tokens
    rows = [SamplingRow(SamplingParams(temperature=0), 0, 0, [0], [], draft=d) for d in (0, 1)]
    greedy = sample(logits.expand(2, -1).clone(), rows)
    assert greedy.tokens == [0, 0] and greedy.accepted == [True, False]


def test_logprobs_are_raw_and_top_logprobs_sorted():
    params = SamplingParams(temperature=1.5, logprobs=2, repetition_penalty=1.5)
    out = sample(LOGITS.expand(2, -1).clone(), [SamplingRow(params, s, 0, [0], [0]) for s in range(2)])
    lp = LOGITS.log_softmax(-1)
    for token, logprob, top in zip(out.tokens, out.logprobs, out.top_logprobs, strict=True):
        assert abs(logprob - float(lp[token])) < 1e-6
        assert [i for i, _ in top] == [0, 1] and abs(top[0][1] - float(lp[0])) < 1e-6
    none = sample(LOGITS.expand(1, -1).clone(), _rows(SamplingParams(), n=1))
    assert none.logprobs is None and none.top_logprobs is None


@pytest.mark.parametrize(
    "positions, is_slice",
    [([], True), ([3], True), ([0, 1, 2, 3], True), ([1, 3, 5], True), ([2, 0], False), ([0, 0, 1], False),
     ([0, 1, 3], False)],
)
def test_device_index_reads_and_writes_like_an_index_tensor(positions, is_slice):
    """Evenly spaced positions become a slice (no copy to the device); either way the index reads and
    writes the positions it was given, in their order."""
    index = device_index(positions, torch.device("cpu"))
    assert isinstance(index, slice) == is_slice
    t = torch.arange(10) * 10
    assert t[index].tolist() == [10 * p for p in positions]
    if len(set(positions)) == len(positions):
        t[index] = -torch.arange(len(positions)) - 1
        assert [t[p].item() for p in positions] == [-k - 1 for k in range(len(positions))]
