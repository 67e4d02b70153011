"""generate(): greedy equals full recomputation and transformers' generate; batching, sampling, eos."""

from __future__ import annotations

import pytest
import torch

from dsv3.infer import generate
from dsv3.infer.generate import left_pad, sample_next
from dsv3.model.hf import load_hf
from tests.conftest import YARN, hf_model
from tests.infer.conftest import scaled_model

N_NEW = 32


def _recompute_greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding the slow way: the whole sequence through the model (no cache) at every step."""
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat((ids, model(ids)[:, -1].argmax(-1, keepdim=True)), dim=1)
    return ids[:, -n:]


def _hf_greedy(hf, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    out = hf.generate(
        ids,
        attention_mask=torch.ones_like(ids) if attention_mask is None else attention_mask,
        max_new_tokens=N_NEW,
        do_sample=False,
        use_cache=True,
        pad_token_id=0,
        eos_token_id=None,  # random weights: no early stop, exactly N_NEW new tokens
    )
    assert out.shape == (ids.shape[0], ids.shape[1] + N_NEW)
    return out[:, ids.shape[1] :]


@pytest.fixture
def pair(tmp_path, make_config):
    """(transformers' model, ours loaded from its save_pretrained) for config overrides."""

    def build(**overrides):
        hf = hf_model(make_config(**overrides))
        hf.save_pretrained(tmp_path / "hf")
        return hf, load_hf(tmp_path / "hf").eval()

    return build


@pytest.mark.parametrize(
    "overrides",
    [{}, {"rope_scaling": YARN}, {"q_lora_rank": None, "n_group": 1, "topk_group": 1}],
    ids=["q_lora+groups+dense", "yarn", "no_q_lora"],
)
def test_greedy_equals_recomputation_and_transformers(pair, overrides):
    hf, ours = pair(**overrides)
    ids = torch.randint(0, ours.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    got = generate(ours, ids, N_NEW)
    assert got.shape == (2, N_NEW)
    assert torch.equal(got, _recompute_greedy(ours, ids, N_NEW))
    assert torch.equal(got, _hf_greedy(hf, ids))


def test_prompts_of_different_lengths_equal_each_alone_and_transformers(pair):
    hf, ours = pair()
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, ours.config.vocab_size, (n,), generator=gen).tolist() for n in (7, 1, 4, 12)]
    batched = generate(ours, prompts, N_NEW)
    for row, prompt in zip(batched, prompts, strict=True):
        assert torch.equal(row, generate(ours, [prompt], N_NEW)[0])
    ids, pad = left_pad(prompts, pad_id=0)
    mask = (torch.arange(ids.shape[1]) >= pad.unsqueeze(1)).long()
    assert torch.equal(generate(ours, ids, N_NEW, attention_mask=mask), batched)
    assert torch.equal(_hf_greedy(hf, ids, mask), batched)  # transformers' left padding agrees


def test_compiled_model_generates_like_eager(make_config):
    """A model compiled for training (compile_blocks) generates eagerly, with the same tokens."""
    model = scaled_model(make_config(), blocks=5.0)
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(3))
    eager = generate(model, ids, 8)
    model.compile_blocks()
    assert torch.equal(generate(model, ids, 8), eager)


def test_generate_with_compiled_blocks_gives_the_eager_tokens(make_config, caplog):
    """`compile=True`: every block through torch.compile (dynamic shapes: the prefill and the decode
    step share the compile), prompts of different lengths, the same greedy tokens as eager."""
    model = scaled_model(make_config(), blocks=5.0)
    prompts = [[5, 9, 2, 7, 1], [3]]
    with caplog.at_level("WARNING"):
        compiled = generate(model, prompts, 8, compile=True)
    assert not [r for r in caplog.records if "uncompiled" in r.message]  # it did compile
    assert torch.equal(compiled, generate(model, prompts, 8))


def test_sampling_is_seeded_and_reproducible(make_config):
    model = scaled_model(make_config(), blocks=5.0, head=2.0)
    prompts = [[1, 2, 3], [4]]

    def sample(seed: int, **kw) -> torch.Tensor:
        return generate(model, prompts, 16, generator=torch.Generator().manual_seed(seed), **kw)

    for kw in ({"temperature": 1.0}, {"temperature": 0.7, "top_p": 0.9}):
        assert torch.equal(sample(0, **kw), sample(0, **kw))
        assert not torch.equal(sample(0, **kw), sample(1, **kw))
    torch.manual_seed(5)  # no generator: torch's global RNG, as the trainer's samples use it
    first = generate(model, prompts, 16, temperature=1.0)
    torch.manual_seed(5)
    assert torch.equal(generate(model, prompts, 16, temperature=1.0), first)
    # a nucleus so small it holds only the top token is greedy decoding
    assert torch.equal(sample(0, temperature=1.0, top_p=1e-6), generate(model, prompts, 16))


def test_temperature_and_top_p_shape_the_distribution():
    logits = torch.tensor([[2.0, 1.5, 0.8, -0.6, -3.0]]).expand(20_000, 5)
    gen = torch.Generator().manual_seed(0)

    def freq(**kw) -> torch.Tensor:
        draws = sample_next(logits, generator=gen, **kw)
        return torch.bincount(draws, minlength=5).float() / draws.numel()

    for t in (0.5, 1.0, 2.0):
        torch.testing.assert_close(
            freq(temperature=t, top_p=1.0), (logits[0] / t).softmax(-1), atol=0.015, rtol=0
        )
    probs = logits[0].softmax(-1)  # 0.48, 0.29, 0.14, 0.04, 0.00
    nucleus = probs.clone()
    nucleus[2:] = 0  # the top two reach 0.7
    torch.testing.assert_close(freq(temperature=1.0, top_p=0.7), nucleus / nucleus.sum(), atol=0.015, rtol=0)
    assert torch.equal(sample_next(logits[:3], 0.0, 1.0, None), torch.zeros(3, dtype=torch.long))


def test_eos_stops_a_row_and_pads_the_rest(make_config):
    model = scaled_model(make_config(), blocks=5.0)
    prompts = [[1, 2, 3], [9, 8, 7, 6]]
    free = generate(model, prompts, 20)
    both = [t for t in free[0].tolist() if t in free[1].tolist()]
    eos = both[0] if both else int(free[0, 5])  # one both rows emit, so the output gets shorter
    stop0 = int((free[0] == eos).nonzero()[0])
    hits1 = (free[1] == eos).nonzero()
    stop1 = int(hits1[0]) if len(hits1) else None
    out = generate(model, prompts, 20, eos_token_id=eos, pad_token_id=127)
    assert torch.equal(out[0, : stop0 + 1], free[0, : stop0 + 1])
    assert (out[0, stop0 + 1 :] == 127).all()
    width = 20 if stop1 is None else max(stop0, stop1) + 1
    assert out.shape == (2, width)  # stops as soon as every row has finished
    alone = generate(model, [prompts[0]], 20, eos_token_id=eos)
    assert torch.equal(alone, free[:1, : stop0 + 1])  # one row: ends with its eos, nothing after


def test_bad_arguments_get_one_line_errors(make_config):
    model = scaled_model(make_config())
    ids = torch.tensor([[1, 2, 3]])
    cases = [
        (dict(input_ids=ids, max_new_tokens=0), "max_new_tokens 0"),
        (dict(input_ids=ids, max_new_tokens=4, top_p=0.0), "top_p 0.0"),
        (dict(input_ids=ids, max_new_tokens=4, temperature=-1.0), "temperature -1.0"),
        (dict(input_ids=torch.tensor([[1, 200]]), max_new_tokens=4), "outside the vocabulary"),
        (dict(input_ids=ids, max_new_tokens=4, eos_token_id=128), "eos_token_id 128"),
        (dict(input_ids=[[1], []], max_new_tokens=4), "at least one token"),
        (dict(input_ids=torch.tensor([1, 2]), max_new_tokens=4), "integer \\(B, T\\)"),
        (
            dict(input_ids=ids, max_new_tokens=4, attention_mask=torch.tensor([[1, 1, 0]])),
            "row 0 is not left",
        ),
        (dict(input_ids=ids, max_new_tokens=4, attention_mask=torch.ones(1, 2)), "attention_mask has shape"),
        (dict(input_ids=ids, max_new_tokens=4, cuda_graph=True), "cuda_graph needs"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            generate(model, **kwargs)


def test_a_failed_cuda_graph_capture_falls_back_to_eager_decoding(monkeypatch, caplog):
    import importlib

    generate_module = importlib.import_module("dsv3.infer.generate")  # the module, not the function

    def failing_capture(step, example):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\n(details)")

    monkeypatch.setattr(generate_module, "_graphed", failing_capture)
    step = lambda x: x + 1  # noqa: E731
    with caplog.at_level("WARNING"):
        assert generate_module._graphed_or_eager(step, torch.zeros(2, 1)) is step
    assert "decoding without a CUDA graph (capture failed: CUDA error: operation not permitted" in caplog.text
