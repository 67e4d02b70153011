"""`CausalLM`'s log-likelihoods and generations equal transformers' computed one sequence at a time."""

from __future__ import annotations

import random

import pytest
import torch

from dsv3.eval.backends import load_checkpoint, load_transformers
from dsv3.eval.lm import GenerationRequest, LoglikelihoodRequest, cut_at_stop, rolling_windows
from dsv3.eval.tasks import TASKS
from tests.eval.conftest import HELLASWAG, MMLU_DEV, MMLU_TEST


def fixture_loader(dataset: str, split: str) -> list[dict]:
    return {("mmlu", "dev"): MMLU_DEV, ("mmlu", "test"): MMLU_TEST, ("hellaswag", "validation"): HELLASWAG}[
        (dataset, split)
    ]


def choice_requests(shots: int = 2) -> list[LoglikelihoodRequest]:
    items = TASKS["mmlu"].build(MMLU_TEST, shots, random.Random(0), fixture_loader)
    items += TASKS["hellaswag"].build(HELLASWAG, 1, random.Random(0), fixture_loader)
    return [LoglikelihoodRequest(item.context, choice) for item in items for choice in item.choices]


def reference_logprob(model, tokenizer, context: str, continuation: str, max_length: int = 10**9) -> float:
    """log p(continuation | EOS + context) from one unbatched transformers forward, in float32."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx = tokenizer.encode(context, add_special_tokens=False)
    cont = tokenizer.encode(context + continuation, add_special_tokens=False)[len(ctx) :]
    ids = ([tokenizer.eos_token_id] + ctx + cont)[-(max_length + 1) :]
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0].float()
    logp = logits.log_softmax(-1)[-len(cont) :]
    return float(logp.gather(-1, torch.tensor(cont)[:, None]).sum())


@pytest.fixture(scope="module", params=["checkpoint", "transformers"])
def lm(request, tiny_hf_dir):
    if request.param == "checkpoint":
        return load_checkpoint(tiny_hf_dir, device="cpu", batch_tokens=4096, batch_size=8)
    return load_transformers(tiny_hf_dir, device="cpu", dtype="float32", batch_tokens=4096, batch_size=8)


@pytest.fixture(scope="module")
def expected_choice_logprobs(reference_model) -> list[float]:
    model, tokenizer = reference_model
    return [reference_logprob(model, tokenizer, r.context, r.continuation) for r in choice_requests()]


def test_mmlu_and_hellaswag_loglikelihoods_match_transformers(lm, expected_choice_logprobs):
    got = lm.loglikelihood(choice_requests())
    assert [r.logprob for r in got] == pytest.approx(expected_choice_logprobs, abs=2e-4)
    assert min(r.logprob for r in got) < -1  # real numbers, not zeros


def test_is_greedy_matches_argmax(lm, reference_model):
    model, tokenizer = reference_model
    context = "def parse_args(argv):\n    "
    ids = [tokenizer.eos_token_id] + tokenizer.encode(context, add_special_tokens=False)
    with torch.no_grad():
        best = int(model(torch.tensor([ids])).logits[0, -1].argmax())
    worst = int(model(torch.tensor([ids])).logits[0, -1].argmin())
    greedy, other = lm.score_tokens([(ids, [best]), (ids, [worst])])
    assert greedy.is_greedy and not other.is_greedy


def test_batching_does_not_change_the_numbers(tiny_hf_dir):
    requests = choice_requests()
    one = load_checkpoint(tiny_hf_dir, device="cpu", batch_size=1).loglikelihood(requests)
    many = load_checkpoint(tiny_hf_dir, device="cpu", batch_size=64).loglikelihood(requests)
    assert [r.logprob for r in one] == pytest.approx([r.logprob for r in many], abs=1e-5)


def test_long_contexts_lose_tokens_on_the_left(tiny_hf_dir, reference_model):
    model, tokenizer = reference_model
    lm = load_checkpoint(tiny_hf_dir, device="cpu", max_length=24)
    request = LoglikelihoodRequest(
        "one two three four five six seven eight nine ten eleven twelve", " thirteen"
    )
    got = lm.loglikelihood([request])[0].logprob
    assert got == pytest.approx(
        reference_logprob(model, tokenizer, request.context, request.continuation, 24), abs=2e-4
    )
    with pytest.raises(ValueError, match="does not fit"):
        lm.loglikelihood([LoglikelihoodRequest("x", " y" * 40)])


def test_rolling_windows_score_every_token_once_with_the_most_context():
    tokens = list(range(10, 20))
    windows = rolling_windows(tokens, [0], 4)
    assert [cont for _, cont in windows] == [[10, 11, 12, 13], [14, 15, 16, 17], [18, 19]]
    assert windows[0][0] == [0] and windows[1][0] == [13] and windows[2][0] == [15, 16, 17]
    for context, continuation in windows:
        assert len(context) + len(continuation) - 1 <= 4  # the model input fits


def test_loglikelihood_rolling_equals_the_whole_sequence_when_it_fits(lm, reference_model):
    model, tokenizer = reference_model
    text = "import os\nprint(os.getcwd())\n"
    expected = reference_logprob(model, tokenizer, "", text)
    assert lm.loglikelihood_rolling([text])[0] == pytest.approx(expected, abs=2e-4)


def test_loglikelihood_rolling_over_several_windows(tiny_hf_dir, reference_model):
    model, tokenizer = reference_model
    lm = load_checkpoint(tiny_hf_dir, device="cpu", max_length=8)
    text = "the quick brown fox jumps over the lazy dog and runs far away"
    tokens = tokenizer.encode(text, add_special_tokens=False)
    assert len(tokens) > 16
    expected, full = 0.0, [tokenizer.eos_token_id] + tokens
    for start in range(0, len(tokens), 8):  # predict full[start + 1 : end + 1] from the 8 tokens before
        end = min(start + 8, len(tokens))
        with torch.no_grad():
            logp = model(torch.tensor([full[max(0, end - 8) : end]])).logits[0].float().log_softmax(-1)
        targets = torch.tensor(full[start + 1 : end + 1])
        expected += float(logp[-len(targets) :].gather(-1, targets[:, None]).sum())
    assert lm.loglikelihood_rolling([text])[0] == pytest.approx(expected, abs=2e-4)


def reference_generation(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """transformers' greedy generate after EOS + prompt, decoded (no stop at EOS)."""
    ids = torch.tensor([[tokenizer.eos_token_id] + tokenizer.encode(prompt, add_special_tokens=False)])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :].tolist())


def test_greedy_generation_matches_transformers_generate(tiny_hf_dir, reference_model):
    prompts = ["def add(a, b):\n", "import sys\n\nclass Parser:\n    "]
    ours = load_checkpoint(tiny_hf_dir, device="cpu").generate([GenerationRequest(p, 12) for p in prompts])
    assert ours == [reference_generation(*reference_model, p, 12) for p in prompts]


def test_generation_in_rounds_stops_where_one_long_generation_would_be_cut(tiny_hf_dir, reference_model):
    full = reference_generation(*reference_model, "def add(a, b):\n", 20)
    stop = full[len(full) // 2 : len(full) // 2 + 2]  # first seen after several 2-token rounds
    lm = load_checkpoint(tiny_hf_dir, device="cpu", first_round=2)
    requests = [
        GenerationRequest("def add(a, b):\n", 20, stop=(stop,)),
        GenerationRequest("def add(a, b):\n", 20),
    ]
    assert lm.generate(requests) == [cut_at_stop(full, [stop]), full]


def test_generation_stops_at_stop_strings_and_sampling_follows_the_seed(lm):
    requests = [GenerationRequest("x = ", 10, stop=("\n",), temperature=1.0)] * 3
    first, again = lm.generate(requests, seed=3), lm.generate(requests, seed=3)
    assert first == again
    assert all("\n" not in text for text in first)
    assert len(set(lm.generate(requests * 2, seed=4))) > 1  # samples differ


def test_cut_at_stop():
    assert cut_at_stop("a\nb\n\nc", ["\n\n", "Q:"]) == "a\nb"
    assert cut_at_stop("abc Q: d\n\n", ["\n\n", "Q:"]) == "abc "
    assert cut_at_stop("abc", []) == "abc"
