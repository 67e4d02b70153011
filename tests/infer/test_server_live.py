"""`dsv3 serve` as a user runs it: a live process on loopback, driven by the real `openai` client and by
httpx; concurrency, a bounded load test, disconnects, a full queue, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import dsv3
from dsv3.infer import generate
from dsv3.infer.llm import LLM
from dsv3.infer.sampling import SamplingParams

MAX_LEN = 128
START_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(checkpoint: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(dsv3.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "dsv3", "serve", "--checkpoint", str(checkpoint), "--port", str(port),
         "--served-model-name", "tiny", "--max-model-len", str(MAX_LEN), *flags],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dsv3 serve exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"dsv3 serve did not come up in {START_TIMEOUT_S} s:\n{proc.stdout.read()}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def live(served_checkpoint) -> Iterator[str]:
    proc, url = _start(served_checkpoint, "--max-num-seqs", "16")
    try:
        yield url
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def offline(served_checkpoint) -> LLM:
    return LLM(served_checkpoint, max_num_seqs=16, max_model_len=MAX_LEN)


def _metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def _idle(url: str, timeout: float = 30) -> dict[str, float]:
    """The metrics once nothing runs and no block is held (the cache leaks nothing)."""
    deadline = time.monotonic() + timeout
    while True:
        m = _metrics(url)
        if m["dsv3_num_requests_running"] == 0 and m["dsv3_kv_cache_usage_ratio"] == 0:
            return m
        assert time.monotonic() < deadline, f"still busy: {m}"
        time.sleep(0.05)


def test_the_openai_client_works_against_dsv3_serve(live, offline):
    client = openai.OpenAI(base_url=f"{live}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    done = client.completions.create(model="tiny", prompt="The river", max_tokens=10, temperature=0)
    want = offline.generate("The river", SamplingParams(max_tokens=10, temperature=0))[0].outputs[0]
    assert done.choices[0].text == want.text and done.usage.completion_tokens == 10
    messages = [{"role": "user", "content": "Where does the river go?"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    ids = offline.engine.tokenizer.encode_chat(messages)
    want = offline.generate(ids, SamplingParams(max_tokens=8, temperature=0))[0].outputs[0]
    assert chat.choices[0].message.content == want.text
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                            stream=True)  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want.text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt="x", top_p=0)
    assert err.value.body["param"] == "top_p"


def test_concurrent_requests_equal_sequential_generation(live, offline):
    """Greedy answers to concurrent requests equal dsv3.infer.generate run on each prompt alone."""
    prompts = [
        "The river",
        "The baker",
        "Once upon",
        "A lantern in the",
        "Stones",
        "The old mill wheel",
        "x",
        "Rain",
    ]
    tok, model = offline.engine.tokenizer, offline.engine.model
    sequential = []
    for p in prompts:
        new = generate(model, [tok.encode_prompt(p)], 16, eos_token_id=tok.eos_id)[0].tolist()
        sequential.append(tok.decode(new[: new.index(tok.eos_id)] if tok.eos_id in new else new))

    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{live}/v1", api_key="unused")
        outs = await asyncio.gather(
            *[
                client.completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0)
                for p in prompts
            ]
        )
        return [o.choices[0].text for o in outs]

    assert asyncio.run(main()) == sequential
    _idle(live)


def _loglikelihood(model, ids: list[int], n_context: int) -> tuple[float, bool]:
    """Sum of the log-probabilities of ids[n_context:] after the rest, and whether each is the argmax:
    one full forward, no cache."""
    with torch.no_grad():
        lp = model(torch.tensor([ids]))[0, n_context - 1 : -1].float().log_softmax(-1)
    target = torch.tensor(ids[n_context:])
    return float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())


def test_lm_eval_local_completions_scores_through_dsv3_serve(live, offline):
    """lm-evaluation-harness's `local-completions` model, as `lm_eval --model local-completions
    --model_args base_url=.../v1/completions,tokenizer_backend=remote` runs it: it tokenizes through
    /tokenize and scores with echo + logprobs; its loglikelihoods (and greedy flags) equal those of a
    full forward of the model, for pairs and for a rolling loglikelihood."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(
        base_url=f"{live}/v1/completions", model="tiny", tokenizer_backend="remote", max_length=MAX_LEN,
        batch_size=3,
    )  # fmt: skip
    pairs = [
        ("The river", " runs"),
        ("Once upon a", " time"),
        ("The baker", " baked bread"),
        ("Rain", " fell"),
    ]
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    tok, model = offline.engine.tokenizer, offline.engine.model
    for (context, continuation), (logprob, greedy) in zip(pairs, got, strict=True):
        want, want_greedy = _loglikelihood(
            model, tok.encode(context + continuation), len(tok.encode(context))
        )
        assert abs(logprob - want) < 1e-3 and greedy == want_greedy
    text = "The river ran past the old mill."
    (rolling,) = lm.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True
    )
    assert abs(rolling - _loglikelihood(model, [tok.eos_id, *tok.encode(text)], 1)[0]) < 1e-3
    _idle(live)


def test_64_concurrent_streaming_clients_finish_without_errors_or_leaked_blocks(live):
    n_clients, requests_each = 64, 2

    async def client_loop(http: httpx.AsyncClient, c: int) -> int:
        tokens = 0
        for r in range(requests_each):
            body = {"prompt": f"The river {c} {r}", "max_tokens": 12, "temperature": 0.8, "seed": c * 10 + r,
                    "stream": True}  # fmt: skip
            async with http.stream("POST", f"{live}/v1/completions", json=body) as resp:
                assert resp.status_code == 200, await resp.aread()
                events = [line async for line in resp.aiter_lines() if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]"
            chunks = [json.loads(e[6:]) for e in events[:-1]]
            assert "error" not in chunks[-1] and chunks[-1]["choices"][0]["finish_reason"] in (
                "length",
                "stop",
            )
            tokens += 1
        return tokens

    async def main() -> list[int]:
        limits = httpx.Limits(max_connections=n_clients)
        async with httpx.AsyncClient(timeout=120, limits=limits) as http:
            return await asyncio.gather(*[client_loop(http, c) for c in range(n_clients)])

    before = _metrics(live)
    assert sum(asyncio.run(main())) == n_clients * requests_each
    after = _idle(live)
    finished = (
        after["dsv3_e2e_request_latency_seconds_count"] - before["dsv3_e2e_request_latency_seconds_count"]
    )
    assert finished == n_clients * requests_each


def test_a_client_that_disconnects_mid_stream_frees_its_blocks(live):
    before = _metrics(live)
    body = {"prompt": "The river", "max_tokens": 100, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{live}/v1/completions", json=body, timeout=60) as resp:
        lines = resp.iter_lines()
        got = [next(lines) for _ in range(4)]  # two events (data + blank line each)
        assert got[0].startswith("data: ")
        assert _metrics(live)["dsv3_kv_cache_usage_ratio"] > 0
    after = _idle(live)  # released as soon as the server saw the disconnect
    generated = after["dsv3_generation_tokens_total"] - before["dsv3_generation_tokens_total"]
    assert generated < 100  # aborted, not run to the end
    assert httpx.post(f"{live}/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_a_full_queue_answers_429_and_sigterm_drains(served_checkpoint):
    proc, url = _start(served_checkpoint, "--max-num-seqs", "1", "--max-waiting", "1")
    try:

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=120) as http:
                body = {"prompt": "The river", "max_tokens": 40, "ignore_eos": True}
                return await asyncio.gather(
                    *[http.post(f"{url}/v1/completions", json=body) for _ in range(6)]
                )

        codes = [r.status_code for r in asyncio.run(burst())]
        assert 200 in codes and 429 in codes and set(codes) <= {200, 429}
        r = next(r for r in asyncio.run(burst()) if r.status_code == 429)
        assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"
        _idle(url)

        # SIGTERM with a stream in flight: it runs to its end, then the process exits cleanly
        body = {"prompt": "The river", "max_tokens": 60, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as resp:
            lines = resp.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        # uvicorn re-raises the signal once it has shut down gracefully: the conventional exit status
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        log = proc.stdout.read()
        assert "draining: 1 requests in flight" in log and "Finished server process" in log
        with pytest.raises(httpx.HTTPError):
            httpx.post(f"{url}/v1/completions", json={"prompt": "x"}, timeout=5)
    finally:
        _stop(proc)
