"""The HTTP server in process (FastAPI's TestClient): the OpenAI endpoints, SSE, errors, metrics."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from dsv3.infer import generate
from dsv3.infer.llm import LLM
from dsv3.infer.sampling import SamplingParams
from dsv3.infer.server import AsyncEngine, build_app
from dsv3.infer.server.async_engine import QueueFull

MAX_LEN = 96


@pytest.fixture(scope="module")
def server(served_checkpoint):
    """(client, the LLM whose engine the app serves), overlapping its steps as on a GPU."""
    llm = LLM(served_checkpoint, max_num_seqs=8, max_model_len=MAX_LEN, async_scheduling=True)
    app = build_app(AsyncEngine(llm.engine, max_waiting=64), "tiny", llm.engine.tokenizer)
    with TestClient(app) as client:
        yield client, llm


@pytest.fixture(scope="module")
def offline(served_checkpoint):
    """A second engine on the same checkpoint: what the server's answers must equal."""
    return LLM(served_checkpoint, max_num_seqs=8, max_model_len=MAX_LEN)


def _events(response) -> list:
    lines = [line for line in response.text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines)
    return [line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]) for line in lines]


def test_completion_equals_the_offline_engine_and_generate(server, offline):
    client, llm = server
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "The river", "max_tokens": 12,
                                             "temperature": 0})  # fmt: skip
    assert r.status_code == 200
    body = r.json()
    choice = body["choices"][0]
    want = offline.generate("The river", SamplingParams(max_tokens=12, temperature=0))[0]
    assert choice["text"] == want.outputs[0].text and choice["finish_reason"] == "length"
    ids = llm.engine.tokenizer.encode_prompt("The river")
    static = generate(llm.engine.model, [ids], 12)[0].tolist()
    assert want.outputs[0].token_ids == static  # the engine's greedy is the static decoder's
    assert body["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": 12,
        "total_tokens": len(ids) + 12,
    }
    assert body["object"] == "text_completion" and body["model"] == "tiny"


def test_logit_bias_steers_the_completion_like_the_offline_engine(server, offline):
    """OpenAI's logit_bias (token ids as JSON's string keys): the greedy completion's first token banned
    gives the offline engine's biased completion, which no longer holds that token."""
    client, _ = server
    plain = offline.generate("The river", SamplingParams(max_tokens=6, temperature=0))[0].outputs[0]
    banned = plain.token_ids[0]
    params = SamplingParams(max_tokens=6, temperature=0, logit_bias={banned: -100})
    want = offline.generate("The river", params)[0].outputs[0]
    assert banned not in want.token_ids and want.text != plain.text
    r = client.post("/v1/completions", json={"prompt": "The river", "max_tokens": 6, "temperature": 0,
                                             "logit_bias": {str(banned): -100}})  # fmt: skip
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == want.text
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
    first = client.post("/v1/chat/completions", json=chat).json()["choices"][0]["message"]["content"]
    r = client.post("/v1/chat/completions", json={**chat, "logit_bias": {"65": 100}})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] != first


def test_several_prompts_and_n_are_indexed_choices(server):
    client, _ = server
    request = {"prompt": ["The river", "The baker"], "max_tokens": 4, "n": 2, "temperature": 1.0, "seed": 3}
    choices = client.post("/v1/completions", json=request).json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert client.post("/v1/completions", json=request).json()["choices"] == choices  # seeded: the same
    ids = client.post("/v1/completions", json={**request, "prompt": [[5, 6, 7], [8, 9]]}).json()["choices"]
    assert [c["index"] for c in ids] == [0, 1, 2, 3]


def test_echo_returns_the_prompt_and_its_logprobs_before_the_completion(server, offline):
    """`echo` + `logprobs` (what lm-eval's local-completions sends to score): the prompt's text and
    tokens come first, the first token's logprob null, the rest the engine's prompt_logprobs
    (checked against a full forward in test_engine), then the completion as without echo."""
    client, llm = server
    tok = llm.engine.tokenizer
    ids = tok.encode_prompt("The river")
    want = offline.generate(ids, SamplingParams(max_tokens=3, temperature=0, logprobs=1, prompt_logprobs=1))[
        0
    ]
    request = {"prompt": "The river", "max_tokens": 3, "temperature": 0, "logprobs": 1, "echo": True}
    choice = client.post("/v1/completions", json=request).json()["choices"][0]
    c = want.outputs[0]
    assert choice["text"] == "The river" + c.text
    lp = choice["logprobs"]
    assert lp["token_logprobs"] == [*want.prompt_logprobs, *c.logprobs]
    assert lp["tokens"] == [tok.decode([t], skip_special_tokens=False) for t in ids + c.token_ids]
    assert lp["top_logprobs"][0] is None
    top = [
        {tok.decode([i], skip_special_tokens=False): v for i, v in t} for t in want.prompt_top_logprobs[1:]
    ]
    assert lp["top_logprobs"][1 : len(ids)] == top
    assert lp["text_offset"] == sorted(lp["text_offset"]) and len(lp["text_offset"]) == len(ids) + 3
    # token ids in, decoded text out; streamed, the first chunk carries the prompt
    by_ids = client.post("/v1/completions", json={**request, "prompt": ids}).json()["choices"][0]
    assert by_ids["logprobs"]["token_logprobs"] == lp["token_logprobs"]
    assert by_ids["text"] == tok.decode(ids) + c.text
    events = _events(client.post("/v1/completions", json={**request, "stream": True}))
    chunks = [e["choices"][0] for e in events[:-1]]
    assert "".join(ch["text"] for ch in chunks) == choice["text"]
    assert sum((ch["logprobs"]["token_logprobs"] for ch in chunks), []) == lp["token_logprobs"]
    # echo without logprobs: only the text
    plain = client.post("/v1/completions", json={**request, "logprobs": None}).json()["choices"][0]
    assert plain["text"] == choice["text"] and plain["logprobs"] is None
    # max_tokens 0 (OpenAI's legacy scoring): the prompt alone, streamed or not
    body = client.post("/v1/completions", json={**request, "max_tokens": 0}).json()
    alone = body["choices"][0]
    assert alone["text"] == "The river" and alone["logprobs"]["token_logprobs"] == want.prompt_logprobs
    assert alone["logprobs"]["tokens"] == lp["tokens"][: len(ids)] and body["usage"]["completion_tokens"] == 0
    streamed = {**request, "max_tokens": 0, "stream": True, "stream_options": {"include_usage": True}}
    events = _events(client.post("/v1/completions", json=streamed))
    assert "".join(e["choices"][0]["text"] for e in events[:-2]) == "The river"
    assert events[-2]["usage"]["completion_tokens"] == 0
    _error(client.post("/v1/completions", json={"prompt": "x", "max_tokens": 0}), 400, "max_tokens")


def test_vllm_prompt_logprobs_give_each_prompt_tokens_logprob_rank_and_top(server, offline):
    """vLLM's `prompt_logprobs: k`: per completion choice (chat: beside the choices) the first prompt
    token null, then {token id: {logprob, rank, decoded_token}} for the token and the k most likely;
    echo's logprobs keep their own top count; streaming asks are a 400 naming the field."""
    client, llm = server
    tok = llm.engine.tokenizer
    ids = tok.encode_prompt("The river")
    want = offline.generate(ids, SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3))[0]
    request = {"prompt": "The river", "max_tokens": 2, "temperature": 0, "prompt_logprobs": 3, "n": 2}
    choices = client.post("/v1/completions", json=request).json()["choices"]
    rows = choices[0]["prompt_logprobs"]
    assert choices[1]["prompt_logprobs"] == rows and len(rows) == len(ids) and rows[0] is None
    for t in range(1, len(ids)):
        row, top = rows[t], want.prompt_top_logprobs[t]
        assert row[str(ids[t])] == {"logprob": want.prompt_logprobs[t], "rank": want.prompt_ranks[t],
                                    "decoded_token": tok.decode([ids[t]], skip_special_tokens=False)}
        for rank, (i, v) in enumerate(top, start=1):
            assert row[str(i)]["logprob"] == v and (row[str(i)]["rank"] == rank or i == ids[t])
        assert len(row) == len({ids[t], *(i for i, _ in top)})
    # with echo: its logprobs show their own top count (1) while prompt_logprobs shows 3
    echo = client.post("/v1/completions", json={**request, "echo": True, "logprobs": 1, "n": 1}).json()
    assert all(len(t) == 1 for t in echo["choices"][0]["logprobs"]["top_logprobs"][1 : len(ids)])
    assert echo["choices"][0]["prompt_logprobs"] == rows
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "prompt_logprobs": 0}
    body = client.post("/v1/chat/completions", json=chat).json()
    assert body["prompt_logprobs"][0] is None and all(len(r) == 1 for r in body["prompt_logprobs"][1:])
    assert body["usage"]["prompt_tokens"] == len(body["prompt_logprobs"])
    _error(client.post("/v1/completions", json={**request, "stream": True}), 400, "prompt_logprobs")
    _error(client.post("/v1/chat/completions", json={**chat, "stream": True}), 400, "prompt_logprobs")
    _error(client.post("/v1/completions", json={**request, "prompt_logprobs": -1}), 400, "prompt_logprobs")


def test_tokenizer_endpoints_tokenize_as_the_server_does(server):
    """vLLM's /tokenize, /detokenize and /tokenizer_info (lm-eval's remote tokenizer)."""
    client, llm = server
    tok = llm.engine.tokenizer
    r = client.post("/tokenize", json={"prompt": "The river"}).json()
    assert r["tokens"] == tok.encode_prompt("The river") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == MAX_LEN
    bare = client.post("/tokenize", json={"prompt": "The river", "add_special_tokens": False}).json()
    assert bare["tokens"] == tok.encode("The river")
    messages = [{"role": "user", "content": "hi"}]
    assert client.post("/tokenize", json={"messages": messages}).json()["tokens"] == tok.encode_chat(messages)
    assert client.post("/detokenize", json={"tokens": bare["tokens"]}).json() == {"prompt": "The river"}
    info = client.get("/tokenizer_info").json()
    assert info["eos_token"] == tok.eos_token and info["chat_template"] == tok.chat_template
    _error(client.post("/tokenize", json={"prompt": "x", "messages": messages}), 400, "prompt")
    _error(client.post("/tokenize", json={}), 400, "prompt")
    _error(client.post("/detokenize", json={"tokens": [10**6]}), 400, "tokens")
    _error(client.post("/detokenize", json={"tokens": "abc"}), 400, "tokens")
    assert client.post("/tokenize", json={"prompt": "x", "model": "gpt-4"}).status_code == 404


def test_streaming_completion_adds_up_to_the_whole(server):
    client, _ = server
    request = {"prompt": "The baker", "max_tokens": 10, "temperature": 0, "logprobs": 1}
    whole = client.post("/v1/completions", json=request).json()
    r = client.post(
        "/v1/completions", json={**request, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _events(r)
    assert events[-1] == "[DONE]" and events[-2]["usage"] == whole["usage"] and events[-2]["choices"] == []
    chunks = [e["choices"][0] for e in events[:-2]]
    assert "".join(c["text"] for c in chunks) == whole["choices"][0]["text"]
    assert [c["finish_reason"] for c in chunks][-1] == "length"
    streamed = sum((c["logprobs"]["token_logprobs"] for c in chunks if c["logprobs"]), [])
    assert streamed == pytest.approx(whole["choices"][0]["logprobs"]["token_logprobs"])
    assert len(streamed) == 10


def test_chat_uses_the_template_and_streams_deltas(server, offline):
    client, llm = server
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The river?"}]
    body = client.post(
        "/v1/chat/completions", json={"messages": messages, "max_tokens": 8, "temperature": 0}
    ).json()
    ids = llm.engine.tokenizer.encode_chat(messages)
    want = offline.generate(ids, SamplingParams(max_tokens=8, temperature=0))[0]
    assert body["choices"][0]["message"] == {"role": "assistant", "content": want.outputs[0].text}
    assert body["object"] == "chat.completion" and body["usage"]["prompt_tokens"] == len(ids)
    request = {"messages": messages, "max_tokens": 8, "temperature": 0, "stream": True, "logprobs": True,
               "top_logprobs": 2}  # fmt: skip
    r = client.post("/v1/chat/completions", json=request)
    events = _events(r)
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    assert deltas[0]["role"] == "assistant" and all("role" not in d for d in deltas[1:])
    assert "".join(d["content"] for d in deltas) == want.outputs[0].text
    entries = sum(
        (e["choices"][0]["logprobs"]["content"] for e in events[:-1] if e["choices"][0]["logprobs"]), []
    )
    assert len(entries) == 8 and all(len(e["top_logprobs"]) == 2 for e in entries)


def test_stop_strings_cut_the_text(server, offline):
    client, _ = server
    free = offline.generate("The river", SamplingParams(max_tokens=20, temperature=0))[0].outputs[0].text
    stop = free[5:8]
    assert stop and free.find(stop) >= 5
    for stream in (False, True):
        r = client.post("/v1/completions", json={"prompt": "The river", "max_tokens": 20, "temperature": 0,
                                                 "stop": [stop], "stream": stream})  # fmt: skip
        if stream:
            chunks = [e["choices"][0] for e in _events(r)[:-1]]
            text, last = "".join(c["text"] for c in chunks), chunks[-1]
        else:
            last = r.json()["choices"][0]
            text = last["text"]
        assert text == free[: free.find(stop)]
        assert (last["finish_reason"], last["stop_reason"]) == ("stop", stop)


def _error(r, status: int, param: str | None = None) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if param is not None:
        assert err["param"] == param and err["message"].startswith(param)
    return err["message"]


def test_bad_requests_get_openai_errors_and_the_server_stays_up(server):
    client, _ = server
    post = lambda path, body: client.post(path, content=body, headers={"content-type": "application/json"})  # noqa: E731
    assert "malformed JSON" in _error(post("/v1/completions", '{"prompt": "x",'), 400)
    assert "malformed JSON" in _error(post("/v1/chat/completions", "not json"), 400)
    assert "does not exist" in _error(
        client.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"}), 404
    )
    long_prompt = " ".join(["river"] * 200)
    _error(client.post("/v1/completions", json={"prompt": long_prompt}), 400, "prompt")
    _error(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": long_prompt}]}),
           400, "messages")  # fmt: skip
    _error(client.post("/v1/completions", json={"prompt": "x", "max_tokens": 500}), 400, "max_tokens")
    cases = [
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "logprobs": 50}, "logprobs"),
        ({"prompt": "x", "top_k": -5}, "top_k"),
        ({"prompt": "x", "frequency_penalty": 9}, "frequency_penalty"),
        ({"prompt": "x", "stop_token_ids": [10**6]}, "stop_token_ids"),
        ({"prompt": "x", "temprature": 0.5}, "temprature"),
        ({"prompt": "x", "logit_bias": {"five": 1.0}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {str(10**6): 1.0}}, "logit_bias"),
        ({"prompt": "x", "echo": True, "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "suffix": "y"}, "suffix"),
        ({"prompt": [10**6]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({}, "prompt"),
    ]
    for body, param in cases:
        _error(client.post("/v1/completions", json=body), 400, param)
    chat_cases = [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        (
            {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
            "max_completion_tokens",
        ),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    ]
    for body, param in chat_cases:
        _error(client.post("/v1/chat/completions", json=body), 400, param)
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_a_full_queue_is_429_with_retry_after(server, monkeypatch):
    client, _ = server
    monkeypatch.setattr(AsyncEngine, "num_waiting", property(lambda self: self.max_waiting))
    r = client.post("/v1/completions", json={"prompt": "x"})
    assert "queue is full" in _error(r, 429) and r.headers["retry-after"] == "1"
    assert isinstance(QueueFull(3, 1), RuntimeError)


@pytest.mark.parametrize("failing_call", [1, 2])  # 2: the overlapped launch of the first decode step
def test_a_failing_step_fails_its_requests_not_the_server(server, monkeypatch, failing_call):
    client, llm = server
    runner = llm.engine.runner
    real = runner.launch
    calls = []

    def failing(batch, after=None):
        calls.append(1)
        if len(calls) == failing_call:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(batch, after)

    monkeypatch.setattr(runner, "launch", failing)
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3})
    assert "simulated" in _error(r, 500)
    assert llm.engine.blocks.num_used == 0
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3}).status_code == 200


def test_models_health_and_metrics(server):
    client, llm = server
    assert client.get("/health").json() == {"status": "ok"}
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"] and models["data"][0]["max_model_len"] == MAX_LEN

    def scrape() -> dict[str, float]:
        r = client.get("/metrics")
        assert r.headers["content-type"].startswith("text/plain")
        return {s.name: s.value for f in text_string_to_metric_families(r.text) for s in f.samples
                if not s.labels or s.labels.get("le") == "+Inf"}  # fmt: skip

    before = scrape()
    client.post("/v1/completions", json={"prompt": "The river", "max_tokens": 5, "temperature": 0})
    client.post("/v1/completions", json={"prompt": "The river", "max_tokens": 5, "temperature": 0})
    after = scrape()
    assert after["dsv3_generation_tokens_total"] - before["dsv3_generation_tokens_total"] == 10
    assert (
        after["dsv3_time_to_first_token_seconds_count"] - before["dsv3_time_to_first_token_seconds_count"]
        == 2
    )
    assert (
        after["dsv3_time_per_output_token_seconds_count"] > 0
        and after["dsv3_e2e_request_latency_seconds_sum"] > 0
    )
    for name in ("dsv3_num_requests_waiting", "dsv3_num_requests_running", "dsv3_kv_cache_usage_ratio",
                 "dsv3_prefix_cache_hit_rate", "dsv3_generation_tokens_per_second",
                 "dsv3_spec_decode_acceptance_rate", "dsv3_num_preemptions_total"):  # fmt: skip
        assert name in after
    assert after["dsv3_num_requests_running"] == 0 and after["dsv3_kv_cache_usage_ratio"] == 0
    assert after["dsv3_generation_tokens_per_second"] > 0
