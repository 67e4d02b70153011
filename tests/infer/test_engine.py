"""The engine's greedy output equals transformers' generate and dsv3's static-batch `generate`, whatever
the engine does underneath: staggered arrivals, prefix caching, chunked prefill, preemption, FP8, MTP
speculation. Seeded sampling is reproducible per request whatever shares its batch."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from dsv3.infer import generate
from dsv3.infer.engine import EngineConfig, LLMEngine, RequestError, RequestOutput, model_runner
from dsv3.infer.llm import LLM
from dsv3.infer.sampling import SamplingParams
from dsv3.model.hf import load_hf
from tests.conftest import base_config, hf_model
from tests.infer.conftest import scaled_model

N_NEW = 24
ARRIVALS = (0, 0, 1, 3, 3, 4, 6, 9)  # the step at which prompt i arrives
SHARED = [11, 22, 33, 44, 55, 66, 77, 88, 99, 10]  # a "system prompt" several requests start with


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(2)
    rand = [torch.randint(0, 128, (n,), generator=gen).tolist() for n in (7, 1, 13, 4, 20)]
    return rand + [SHARED + [1, 2, 3], SHARED + [4, 5], SHARED + [1, 2, 3, 6]]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """(our model loaded from transformers' weights, prompts, transformers' greedy continuations)."""
    cfg = base_config(num_nextn_predict_layers=0, max_position_embeddings=128)
    hf = hf_model(cfg)
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path)
    ours = load_hf(path).eval()
    prompts = _prompts()
    refs = []
    for p in prompts:
        ids = torch.tensor([p])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N_NEW, do_sample=False,
                          pad_token_id=0, eos_token_id=None)  # fmt: skip
        refs.append(out[0, len(p) :].tolist())
    return ours, prompts, refs


def run_staggered(engine: LLMEngine, prompts, params, special=None) -> list[list[int]]:
    """Add prompt i at step ARRIVALS[i] (with `special[i]` instead of `params` if given); step until
    done; every request's tokens. The cache is empty (no block held) at the end."""
    outs, step, pending = {}, 0, list(enumerate(prompts))
    while pending or engine.has_unfinished_requests():
        while pending and ARRIVALS[pending[0][0]] <= step:
            i, p = pending.pop(0)
            engine.add_request(str(i), p, (special or {}).get(i, params))
        for out in engine.step():
            if out.finished:
                outs[int(out.request_id)] = out.outputs[0].token_ids
        step += 1
    assert engine.blocks.num_used == 0  # no leaked block
    return [outs[i] for i in range(len(prompts))]


GREEDY = SamplingParams(max_tokens=N_NEW, temperature=0)

CONFIGS = {
    "default": {},
    "small-blocks": {"block_size": 4},
    "no-prefix-cache": {"block_size": 4, "enable_prefix_caching": False},
    "chunked-prefill": {"block_size": 4, "max_prefill_chunk": 3, "max_num_batched_tokens": 8},
    "tiny-cache-preempts": {"block_size": 4, "num_blocks": 12, "max_model_len": 44, "max_num_seqs": 8},
    "one-at-a-time": {"max_num_seqs": 1},
    "async-scheduling": {"async_scheduling": True},  # on by default on a GPU only
    "async-scheduling-preempts": {"async_scheduling": True, "block_size": 4, "num_blocks": 12,
                                  "max_model_len": 44, "max_num_seqs": 8},
    # the step functions through torch.compile (dynamic shapes), as on a GPU before graph capture
    "compiled": {"block_size": 4, "compile": True},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_equals_transformers_and_generate(references, name):
    model, prompts, refs = references
    if name == "compiled":
        torch._dynamo.reset()  # count this engine's compiles from nothing
        counters.clear()
    engine = LLMEngine(model, None, EngineConfig(**CONFIGS[name]))
    if name == "compiled":  # one graph per kind of block (dense, MoE) and shape family, not per layer:
        # 1 or more rows × 1 token or a chunk; MoE blocks also by expert path (indexed or grouped)
        assert 0 < counters["stats"]["unique_graphs"] <= 4 + 4 * 2
        compiled_at_start = counters["stats"]["unique_graphs"]
    got = run_staggered(engine, prompts, GREEDY)
    assert got == refs
    if name == "compiled":
        assert counters["stats"]["unique_graphs"] == compiled_at_start  # warm-up compiled them all
    if name == "small-blocks":
        assert engine.blocks.prefix_hits > 0  # the shared prefix was served from the cache
        assert all(
            generate(model, [p], N_NEW)[0].tolist() == r for p, r in zip(prompts[:3], refs, strict=False)
        )
    if name == "no-prefix-cache":
        assert engine.blocks.prefix_hits == 0
    if name == "tiny-cache-preempts":
        assert engine.stats.preemptions > 0


def test_one_sequence_engine_compiles_both_expert_paths_at_warm_up(make_config):
    """One row is its own shape to the compiler: with 16 experts of 2 (decode and chunks of up to 4
    tokens index the expert weights) a one-sequence engine's warm-up also compiles the grouped path
    its longer prompts take, so serving compiles nothing, and gives the eager engine's tokens."""
    from dsv3.model.moe import indexed_expert_tokens

    cfg = make_config(n_routed_experts=16)
    assert indexed_expert_tokens(cfg) == 4
    model = scaled_model(cfg, seed=4)
    prompts = [p for p in _prompts() if len(p) > 8][:2]  # chunks of 16 and 32 tokens: the grouped path
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        engine = LLMEngine(model, None, EngineConfig(block_size=4, max_num_seqs=1, compile=compiled))
        at_start = counters["stats"]["unique_graphs"]
        runs.append(run_staggered(engine, prompts, GREEDY))
        assert counters["stats"]["unique_graphs"] == at_start
    assert runs[0] == runs[1]


def test_prefix_hits_give_identical_outputs_and_skip_the_shared_tokens(references):
    model, prompts, refs = references
    engine = LLMEngine(model, None, EngineConfig(block_size=4))
    for i in (5, 6, 7):  # one after the other: each later one finds the shared blocks computed
        engine.add_request(str(i), prompts[i], GREEDY)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    assert out.outputs[0].token_ids == refs[i]
                    cached = out.num_cached_tokens
        # blocks of 4 whose tokens match: 6 shares 10 tokens with 5, 7 shares 13
        assert cached == {5: 0, 6: 8, 7: 12}[i]
    assert engine.prefix_hit_rate > 0
    # Without speculation the token after a block is not in its key: a prompt sharing exactly two
    # blocks reuses both, whatever follows them.
    edge = SHARED[:8] + [42, 43]
    engine.add_request("edge", edge, GREEDY)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                assert out.outputs[0].token_ids == generate(model, [edge], N_NEW)[0].tolist()
                assert out.num_cached_tokens == 8


def test_fp8_cache_generates_the_same_tokens_on_a_decisive_model():
    model = scaled_model(base_config(num_nextn_predict_layers=0, max_position_embeddings=128), blocks=3.0,
                         head=5.0)  # fmt: skip
    prompts = _prompts()
    exact = run_staggered(LLMEngine(model, None, EngineConfig(block_size=4)), prompts, GREEDY)
    fp8 = run_staggered(
        LLMEngine(model, None, EngineConfig(block_size=4, kv_cache_dtype="fp8")), prompts, GREEDY
    )
    assert fp8 == exact  # the logit-level bound (2^-4) is tests/infer/test_paged_cache.py's


def test_a_step_function_the_compiler_fails_on_runs_eagerly(monkeypatch, caplog):
    """torch.compile failing (Inductor on CPU cannot compile the FP8 cache's conversions) costs speed,
    not the server: one warning, then the eager function, whose own errors still surface."""
    from dsv3.infer import compiled

    def broken_compile(fn, **_):
        def run(*args):
            raise RuntimeError("backend failed")

        return run

    monkeypatch.setattr(compiled.torch, "compile", broken_compile)
    calls = []
    step = compiled.compile_dynamic(lambda x: calls.append(x) or x + 1)
    with caplog.at_level("WARNING"):
        assert step(1) == 2 and step(2) == 3
    assert calls == [1, 2]
    assert sum("torch.compile failed: backend failed" in r.message for r in caplog.records) == 1
    with pytest.raises(TypeError):
        step(None)  # the eager function's own error


# --- MTP speculative decoding ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def mtp_model():
    return scaled_model(base_config(num_nextn_predict_layers=1, max_position_embeddings=128), blocks=5.0)


@pytest.mark.parametrize("overlap", [False, True], ids=["read-back", "overlapped"])
@pytest.mark.parametrize(
    "options, graph_tokens",
    [({}, None), ({"block_size": 4, "num_blocks": 14, "max_model_len": 44}, None),
     ({"block_size": 4, "max_prefill_chunk": 3, "max_num_batched_tokens": 8}, 4)],
    ids=["roomy", "tiny-cache", "chunked-eager"],
)  # fmt: skip
def test_speculative_greedy_equals_plain_greedy_and_drafts_are_the_mtp_heads(
    mtp_model, options, graph_tokens, overlap, monkeypatch
):
    """Speculation never changes greedy output; each draft is the MTP head's argmax computed without a
    cache (`mtp_logits` over the whole sequence), so its latent cache is right, preemption included,
    and through chunked prefills and the eager forwards past the step functions' size; also when each
    speculative step is launched before the one it continues is read back (`overlapped`: its rows
    start where that step's acceptance puts them, settled on the device)."""
    if graph_tokens is not None:
        monkeypatch.setattr(model_runner, "GRAPH_TOKENS", graph_tokens)
    prompts = _prompts()
    plain = run_staggered(LLMEngine(mtp_model, None, EngineConfig(**options)), prompts, GREEDY)
    config = EngineConfig(speculative_tokens=1, async_scheduling=overlap, **options)
    engine = LLMEngine(mtp_model, None, config)
    overlapped = _counting_launches(engine)
    drafts = []
    step = engine.step

    def recording_step():
        outs = step()
        drafts.extend((list(s.token_ids), s.draft) for s in engine.scheduler.running if s.draft is not None)
        return outs

    engine.step = recording_step
    assert run_staggered(engine, prompts, GREEDY) == plain
    assert plain[:3] == [generate(mtp_model, [p], N_NEW)[0].tolist() for p in prompts[:3]]
    assert engine.stats.spec_drafts > 0
    assert engine.blocks.num_used == 0
    if overlap:
        assert sum(overlapped) > len(overlapped) // 3  # a good share of the steps overlapped
    else:
        assert not any(overlapped)
    sample = drafts[:: max(1, len(drafts) // 12)]
    with torch.no_grad():
        for tokens, draft in sample:
            expected = mtp_model.mtp_logits(torch.tensor([tokens]))[0, 0, len(tokens) - 2].argmax()
            assert draft == int(expected)


@pytest.mark.slow
def test_compiled_speculation_gives_the_eager_greedy_tokens(mtp_model):
    """The main and the draft step functions through torch.compile (warmed up at start, as on a GPU):
    the same greedy tokens and the same drafts as the eager engine."""
    prompts = _prompts()[:4]
    runs = []
    for compiled in (False, True):
        config = EngineConfig(block_size=4, speculative_tokens=1, compile=compiled)
        engine = LLMEngine(mtp_model, None, config)
        drafts, step = [], engine.step

        def recording_step(engine=engine, step=step, drafts=drafts):
            outs = step()
            drafts.extend((s.request_id, s.num_output, s.draft) for s in engine.scheduler.running)
            return outs

        engine.step = recording_step
        runs.append((run_staggered(engine, prompts, GREEDY), drafts))
    (eager_tokens, eager_drafts), (tokens, drafts) = runs
    assert tokens == eager_tokens and drafts == eager_drafts and len(drafts) > 20


def test_accepted_and_rejected_drafts_give_the_same_tokens_and_fewer_steps(mtp_model):
    """Drafts from an oracle that is right two times in three: every right draft is accepted, every
    wrong one replaced, the output equals plain greedy and takes fewer steps."""
    prompts = _prompts()[:4]
    plain_engine = LLMEngine(mtp_model, None, EngineConfig())
    refs = run_staggered(plain_engine, prompts, GREEDY)
    engine = LLMEngine(mtp_model, None, EngineConfig(speculative_tokens=1))
    by_seq = {}
    collect, step = engine.runner.collect, engine.step
    verdicts = []

    def oracle_step():
        outs = step()
        for s in engine.scheduler.running:
            ref = refs[int(s.request_id)]
            i = s.num_output  # the draft is for this output index
            if i < len(ref):
                s.draft = ref[i] if i % 3 else (ref[i] + 1) % 128
            by_seq[s.seq_id] = s
        return outs

    def checking_collect(launched):
        results = collect(launched)
        for res in results:
            if res.accepted is not None:
                ref = refs[int(res.item.seq.request_id)]
                verdicts.append((res.accepted, res.item.draft == ref[res.item.seq.num_output]))
        return results

    engine.step, engine.runner.collect = oracle_step, checking_collect
    assert run_staggered(engine, prompts, GREEDY) == refs
    assert verdicts and all(accepted == right for accepted, right in verdicts)
    assert 0 < engine.stats.spec_accepted < engine.stats.spec_drafts
    assert engine.stats.steps < plain_engine.stats.steps


@pytest.mark.parametrize("overlap", [False, True], ids=["read-back", "overlapped"])
def test_drafts_made_on_the_device_verify_right_whether_or_not_steps_overlap(mtp_model, overlap):
    """The MTP pass replaced by an oracle on the device that knows the greedy continuation at two
    positions in three: drafts are kept and rejected, the output (with a stop token id and a short
    max_tokens among the requests) equals plain greedy, in fewer steps; overlapped, the next step
    is launched before each one is read back, its rows placed by the acceptance on the device."""
    prompts = _prompts()
    refs = run_staggered(LLMEngine(mtp_model, None, EngineConfig()), prompts, GREEDY)
    stop = refs[2][6]
    special = {2: SamplingParams(max_tokens=N_NEW, temperature=0, stop_token_ids=[stop]),
               4: SamplingParams(max_tokens=5, temperature=0)}  # fmt: skip
    expected = [r[: r.index(stop) + 1] if i == 2 else r[:5] if i == 4 else r for i, r in enumerate(refs)]
    oracle = torch.zeros(128, 128, dtype=torch.long)  # (position, token fed there) → the token after next
    for prompt, ref in zip(prompts, refs, strict=True):
        seq = prompt + ref
        for i in range(len(seq) - 2):
            if i % 3:
                oracle[i, seq[i + 1]] = seq[i + 2]
    plain = LLMEngine(mtp_model, None, EngineConfig(block_size=4))
    assert run_staggered(plain, prompts, GREEDY, special) == expected
    config = EngineConfig(block_size=4, speculative_tokens=1, async_scheduling=overlap)
    engines = []
    for fusing in (True, False):  # greedy rows verifying drafts: one fused step function, or the general path
        engine = LLMEngine(mtp_model, None, config)
        engine.runner._draft_fn = engine.runner._draft_tokens = lambda h, ids, pos, batch: oracle[pos, ids]
        if not fusing:
            engine.runner._fusable = lambda items: False
        overlapped, fused = _counting_launches(engine), _counting_fused_steps(engine)
        assert run_staggered(engine, prompts, GREEDY, special) == expected
        assert 0 < engine.stats.spec_accepted < engine.stats.spec_drafts
        assert (len(fused) > engine.stats.steps // 3) if fusing else not fused
        assert engine.stats.steps < plain.stats.steps and engine.blocks.num_used == 0
        assert (sum(overlapped) > len(overlapped) // 3) if overlap else not any(overlapped)
        engines.append(engine)
    fused, general = (e.stats for e in engines)  # the same drafts kept, in the same steps
    assert (fused.spec_accepted, fused.steps) == (general.spec_accepted, general.steps)


def test_overlapped_steps_write_the_mtp_cache_where_the_acceptance_puts_each_row(mtp_model):
    """Drafts verified from the oracle above while the real MTP pass still runs (filling its cache
    layer): the MTP's outputs, keyed by position, fed token and main hidden state, are the same
    whether each step is read back first or the next one is launched before (its rows moved on the
    device where drafts were accepted)."""
    prompts = _prompts()
    refs = run_staggered(LLMEngine(mtp_model, None, EngineConfig()), prompts, GREEDY)
    oracle = torch.zeros(128, 128, dtype=torch.long)
    for prompt, ref in zip(prompts, refs, strict=True):
        seq = prompt + ref
        for i in range(1, len(seq) - 2, 3):
            oracle[i, seq[i + 1]] = seq[i + 2]
            oracle[i + 1, seq[i + 2]] = seq[i + 3] if i + 3 < len(seq) else 0
    outputs = []
    for overlap in (False, True):
        config = EngineConfig(block_size=4, speculative_tokens=1, async_scheduling=overlap)
        engine = LLMEngine(mtp_model, None, config)
        real, seen = engine.runner._draft_tokens, {}

        def drafting(h, ids, positions, batch, real=real, seen=seen):
            out = real(h, ids, positions, batch)
            columns = positions.flatten().tolist(), ids.flatten().tolist(), h.flatten(0, 1)[:, 0].tolist()
            keys = zip(*columns, strict=True)
            for key, value in zip(keys, out.flatten().tolist(), strict=True):
                seen.setdefault(key, set()).add(value)
            return oracle[positions, ids]

        engine.runner._draft_fn = engine.runner._draft_tokens = drafting
        assert run_staggered(engine, prompts, GREEDY) == refs
        assert engine.stats.spec_accepted > 20
        outputs.append({k: v for k, v in seen.items() if len(v) == 1})  # padding keys collide: left out
    common = set(outputs[0]) & set(outputs[1])
    assert len(common) > 200 and all(outputs[0][k] == outputs[1][k] for k in common)


def test_speculation_needs_an_mtp_module(references):
    with pytest.raises(ValueError, match="no MTP module"):
        LLMEngine(references[0], None, EngineConfig(speculative_tokens=1))


# --- sampling through the engine ---------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(mtp_model):
    """A seeded request samples the same tokens alone, in a crowd of unseeded requests, one at a time,
    and when preempted and recomputed; another seed samples others. With speculation it samples the
    very same tokens (a draft is kept when it is the row's own draw)."""
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=20, seed=7)
    others = SamplingParams(max_tokens=16, temperature=0.8)  # no seed: the engine draws theirs
    prompt = _prompts()[0]
    crowd = _prompts()
    crowd[3] = prompt  # arrives at step 3
    bases = []
    for spec in (0, 1):
        base = run_staggered(
            LLMEngine(mtp_model, None, EngineConfig(speculative_tokens=spec)), [prompt], params
        )[0]
        bases.append(base)
        for options in ({}, {"block_size": 4, "num_blocks": 12, "max_model_len": 44}, {"max_num_seqs": 2}):
            engine = LLMEngine(mtp_model, None, EngineConfig(speculative_tokens=spec, **options))
            assert run_staggered(engine, crowd, others, special={3: params})[3] == base
            if "num_blocks" in options:
                assert engine.stats.preemptions > 0
        other_seed = params.model_copy(update={"seed": 8})
        assert run_staggered(LLMEngine(mtp_model, None, EngineConfig()), [prompt], other_seed)[0] != base
    assert bases[0] == bases[1]


def test_n_completions_are_the_seeds_seed_plus_index(mtp_model):
    prompt = _prompts()[2]
    llm = LLM.from_model(mtp_model)
    three = llm.generate([prompt], SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=100))[0]
    assert [c.index for c in three.outputs] == [0, 1, 2]
    singles = [llm.generate([prompt], SamplingParams(max_tokens=12, temperature=1.0, seed=100 + i))[0]
               for i in range(3)]  # fmt: skip
    assert [c.token_ids for c in three.outputs] == [s.outputs[0].token_ids for s in singles]
    assert len({tuple(c.token_ids) for c in three.outputs}) == 3


def test_logprobs_are_the_models_own(references):
    """Each token's logprob and top logprobs are log-softmax of a full forward (no cache) there."""
    model, prompts, _ = references
    llm = LLM.from_model(model)
    out = llm.generate([prompts[0]], SamplingParams(max_tokens=6, temperature=1.0, seed=3, logprobs=3))[0]
    c = out.outputs[0]
    ids = torch.tensor([prompts[0] + c.token_ids])
    with torch.no_grad():
        lp = model(ids)[0, len(prompts[0]) - 1 : -1].float().log_softmax(-1)
    for t, (token, logprob, top) in enumerate(zip(c.token_ids, c.logprobs, c.top_logprobs, strict=True)):
        assert abs(logprob - float(lp[t, token])) < 1e-4
        values, ids_ = lp[t].topk(3)
        assert [i for i, _ in top] == ids_.tolist()
        assert all(abs(v - float(w)) < 1e-4 for (_, v), w in zip(top, values, strict=True))


@pytest.mark.parametrize("name", ["default", "chunked-prefill", "tiny-cache-preempts", "async-scheduling"])
def test_prompt_logprobs_are_the_models_own_however_the_prompt_is_computed(references, name):
    """Every prompt token's logprob and top logprobs are log-softmax of a full forward (no cache) at
    the position before it, through chunked prefill, preemption and overlapped steps; the shared
    prompts still score every token (the prefix cache is bypassed until they are scored), and
    completions stay those of plain greedy decoding."""
    model, prompts, refs = references
    engine = LLMEngine(model, None, EngineConfig(**{"max_model_len": 64, **CONFIGS[name]}))
    params = SamplingParams(max_tokens=N_NEW, temperature=0, prompt_logprobs=2)
    outs, step, pending = {}, 0, list(enumerate(prompts))
    while pending or engine.has_unfinished_requests():
        while pending and ARRIVALS[pending[0][0]] <= step:
            i, p = pending.pop(0)
            engine.add_request(str(i), p, params)
        for out in engine.step():
            if out.finished:
                outs[int(out.request_id)] = out
        step += 1
    assert engine.blocks.num_used == 0
    assert name != "tiny-cache-preempts" or engine.stats.preemptions > 0
    for i, p in enumerate(prompts):
        out = outs[i]
        assert out.outputs[0].token_ids == refs[i]
        with torch.no_grad():
            lp = model(torch.tensor([p]))[0, :-1].float().log_softmax(-1)
        assert len(out.prompt_logprobs) == len(out.prompt_top_logprobs) == len(out.prompt_ranks) == len(p)
        assert out.prompt_logprobs[0] is None and out.prompt_top_logprobs[0] == []
        assert out.prompt_ranks[0] is None
        for t in range(1, len(p)):
            assert abs(out.prompt_logprobs[t] - float(lp[t - 1, p[t]])) < 1e-4, (i, t)
            assert out.prompt_ranks[t] == int((lp[t - 1] > lp[t - 1, p[t]]).sum()) + 1, (i, t)
            values, ids = lp[t - 1].topk(2)
            assert [j for j, _ in out.prompt_top_logprobs[t]] == ids.tolist()
            assert all(
                abs(v - float(w)) < 1e-4 for (_, v), w in zip(out.prompt_top_logprobs[t], values, strict=True)
            )


def test_prompt_logprobs_bypass_the_prefix_cache_only_while_unscored(references):
    """A request asking for prompt logprobs computes every prompt position even when its prefix is
    cached; its other completions (n = 2) still take the cache, and so do requests without them."""
    model, _, _ = references
    llm = LLM.from_model(model, config=EngineConfig(max_model_len=64, block_size=4))
    blocks, prompt, plain = llm.engine.blocks, SHARED + [1, 2, 3], SamplingParams(max_tokens=2, temperature=0)

    def hits(params: SamplingParams) -> tuple[int, RequestOutput]:
        before = blocks.prefix_hits
        out = llm.generate([prompt], params)[0]
        return blocks.prefix_hits - before, out

    hits(plain)
    cached, _ = hits(plain)
    assert cached > 0
    scored, out = hits(SamplingParams(max_tokens=2, temperature=0, n=2, prompt_logprobs=0))
    assert scored == cached  # the second completion's hits only
    assert len(out.prompt_logprobs) == len(prompt) and all(v < 0 for v in out.prompt_logprobs[1:])
    assert out.prompt_top_logprobs[1:] == [[]] * (len(prompt) - 1)
    assert out.outputs[0].token_ids == out.outputs[1].token_ids
    assert hits(plain)[0] == cached


def test_stop_token_ids_eos_and_max_tokens_end_a_sequence(references):
    model, prompts, refs = references
    ref = refs[0]
    stop = ref[5]
    first = ref.index(stop)
    llm = LLM.from_model(model)
    out = llm.generate([prompts[0]], SamplingParams(max_tokens=N_NEW, temperature=0, stop_token_ids=[stop]))[
        0
    ]
    c = out.outputs[0]
    assert c.token_ids == ref[: first + 1] and (c.finish_reason, c.stop_reason) == ("stop", stop)
    ignore = llm.generate([prompts[0]], SamplingParams(max_tokens=N_NEW, temperature=0, min_tokens=first + 1,
                                                       stop_token_ids=[stop]))[0]  # fmt: skip
    assert ignore.outputs[0].token_ids[first] != stop  # banned before min_tokens: another token comes
    eos_llm = LLM.from_model(model, None, EngineConfig())
    eos_llm.engine.eos_ids = frozenset({stop})
    eos_llm.engine.runner.eos_ids = (stop,)
    c = eos_llm.generate([prompts[0]], SamplingParams(max_tokens=N_NEW, temperature=0))[0].outputs[0]
    assert (c.token_ids, c.finish_reason, c.stop_reason) == (ref[: first + 1], "stop", None)
    c = eos_llm.generate([prompts[0]], SamplingParams(max_tokens=N_NEW, temperature=0, ignore_eos=True))[0]
    assert c.outputs[0].token_ids == ref
    c = llm.generate([prompts[0]], SamplingParams(max_tokens=3, temperature=0))[0].outputs[0]
    assert (c.token_ids, c.finish_reason) == (ref[:3], "length")


def test_final_only_requests_output_once_the_same_as_streamed_ones(references):
    """A request added with final_only appears in step()'s outputs once, finished, equal to the last
    output of the same request streamed step by step."""
    model, prompts, _ = references
    engine = LLMEngine(model, None, EngineConfig(block_size=4))
    params = SamplingParams(max_tokens=N_NEW, temperature=1.0, seed=4, logprobs=1)
    engine.add_request("streamed", prompts[2], params)
    engine.add_request("final", prompts[2], params, final_only=True)
    seen: dict[str, list] = {"streamed": [], "final": []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    assert len(seen["streamed"]) == N_NEW and [o.finished for o in seen["final"]] == [True]
    a, b = seen["streamed"][-1].outputs[0], seen["final"][0].outputs[0]
    assert (a.token_ids, a.finish_reason, a.logprobs) == (b.token_ids, b.finish_reason, b.logprobs)


def test_abort_releases_blocks_at_once(references):
    model, prompts, _ = references
    engine = LLMEngine(model, None, EngineConfig(block_size=4))
    for i, p in enumerate(prompts[:3]):
        engine.add_request(str(i), p, SamplingParams(max_tokens=N_NEW, temperature=0))
    engine.step()
    engine.step()
    held = engine.blocks.num_used
    out = engine.abort_request("2")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert engine.blocks.num_used < held and engine.abort_request("2") is None
    engine.abort_request("0")
    engine.abort_request("1")
    assert engine.blocks.num_used == 0 and not engine.has_unfinished_requests()


def _recording(engine: LLMEngine, method: str, note) -> list:
    """Wrap the runner's `method`: each call first records `note(*its arguments)`."""
    original, notes = getattr(engine.runner, method), []

    def recording(*args, **kwargs):
        notes.append(note(*args, **kwargs))
        return original(*args, **kwargs)

    setattr(engine.runner, method, recording)
    return notes


def _counting_launches(engine: LLMEngine) -> list[bool]:
    """Record, per launched step, whether it was overlapped (launched after a step not yet read back)."""
    return _recording(engine, "launch", lambda batch, after=None: after is not None)


def _counting_fused_steps(engine: LLMEngine) -> list[list[str]]:
    """Record the requests of each decode group that ran as one greedy speculative step (`_speculate`)."""
    return _recording(engine, "_speculate", lambda items, after: [s.seq.request_id for s in items])


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=N_NEW, temperature=1.0, seed=7),
        SamplingParams(max_tokens=N_NEW, temperature=0, logprobs=1),
        SamplingParams(max_tokens=N_NEW, temperature=0, min_tokens=N_NEW, stop_token_ids=[5]),
        SamplingParams(max_tokens=N_NEW, temperature=0, repetition_penalty=1.3),
        SamplingParams(max_tokens=N_NEW, temperature=0, logit_bias={7: 4.0, 9: -100}),
    ],
    ids=["sampled", "logprobs", "min_tokens", "penalty", "logit_bias"],
)
def test_fused_speculative_steps_only_take_plain_greedy_rows(mtp_model, params):
    """A decode group with a row that is sampled, wants logprobs, still bans tokens before
    min_tokens, is penalised or biases logits never runs as the fused greedy step (whose pick is the
    model's argmax); the
    output is the speculative engine's general path's, which equals decoding without drafts."""
    prompts = _prompts()[:4]
    special = {3: params}  # arrives third: the others decode without it first
    plain = run_staggered(LLMEngine(mtp_model, None, EngineConfig(block_size=4)), prompts, GREEDY, special)
    engine = LLMEngine(mtp_model, None, EngineConfig(block_size=4, speculative_tokens=1))
    fused = _counting_fused_steps(engine)
    groups = _recording(engine, "launch", lambda batch, after=None: [s.seq.request_id for s in batch.decode])
    assert run_staggered(engine, prompts, GREEDY, special) == plain
    assert sum("3" in g for g in groups) > 3  # request 3 decoded beside the others
    assert fused and not any("3" in g for g in fused)


def test_overlapped_steps_give_the_same_outputs_as_read_back_steps(references):
    """With async scheduling the engine launches a step's decode rows again before reading it back;
    every output (greedy, seeded sampling with top-p/top-k, min_tokens, stop token ids, max_tokens,
    logprobs, logit_bias; penalties, which fall back to read-back steps) is what the engine gives
    when it reads every step back first, under staggered arrivals and a preempting cache."""
    model, prompts, refs = references
    stop = refs[1][4]
    special = {
        1: SamplingParams(max_tokens=N_NEW, temperature=0, stop_token_ids=[stop]),
        2: SamplingParams(max_tokens=N_NEW, temperature=1.0, top_p=0.9, top_k=20, seed=5, logprobs=2),
        3: SamplingParams(max_tokens=N_NEW, temperature=0.7, seed=6, min_tokens=10,
                          stop_token_ids=[refs[3][2]]),
        4: SamplingParams(max_tokens=5, temperature=0),
        5: SamplingParams(max_tokens=N_NEW, temperature=0, logit_bias={refs[5][0]: -100, refs[5][3]: 2.0}),
        6: SamplingParams(max_tokens=N_NEW, temperature=0.9, seed=9, repetition_penalty=1.3),
    }
    for options in ({}, {"block_size": 4, "num_blocks": 12, "max_model_len": 44, "max_num_seqs": 8}):
        runs = []
        for overlap in (False, True):
            engine = LLMEngine(model, None, EngineConfig(async_scheduling=overlap, **options))
            overlapped = _counting_launches(engine)
            outs, step, pending = {}, 0, list(enumerate(prompts))
            while pending or engine.has_unfinished_requests():
                while pending and ARRIVALS[pending[0][0]] <= step:
                    i, p = pending.pop(0)
                    engine.add_request(str(i), p, special.get(i, GREEDY))
                for out in engine.step():
                    if out.finished:
                        c = out.outputs[0]
                        outs[int(out.request_id)] = (c.token_ids, c.finish_reason, c.stop_reason, c.logprobs)
                step += 1
            assert engine.blocks.num_used == 0
            runs.append([outs[i] for i in range(len(prompts))])
            assert any(overlapped) == overlap
            if "num_blocks" in options:
                assert engine.stats.preemptions > 0
        for (tokens, reason, stop_reason, logprobs), again in zip(runs[0], runs[1], strict=True):
            assert (tokens, reason, stop_reason) == again[:3]  # logprobs: the batch's padding differs
            assert logprobs is None or max(abs(a - b) for a, b in zip(logprobs, again[3], strict=True)) < 1e-4
        assert runs[1][1][:3] == (refs[1][: refs[1].index(stop) + 1], "stop", stop)
        assert len(runs[1][4][0]) == 5
        assert runs[1][0][0] == refs[0]
        biased = runs[1][5][0]  # the greedy reference's first token banned: another continuation
        assert refs[5][0] not in biased and biased != refs[5]


def test_a_prompt_admitted_into_an_overlapped_step_is_prefilled_once(references):
    """A request admitted into an overlapped step whose only decode row turns out to have stopped:
    the step is still read back for the new prompt, not dropped and its prefill done again."""
    model, prompts, refs = references
    stop = refs[0][5]
    first = refs[0].index(stop)
    engine = LLMEngine(model, None, EngineConfig(async_scheduling=True))

    def prefilled(batch, after=None):
        return [s.seq.request_id for s in batch.prefill]

    prefills = _recording(engine, "launch", prefilled)
    greedy = SamplingParams(max_tokens=N_NEW, temperature=0, stop_token_ids=[stop])
    engine.add_request("a", prompts[0], greedy)
    outs = {}
    for call in range(1, 200):
        if call == first + 1:  # the call that reads back a's stop token
            engine.add_request("b", prompts[2], GREEDY)
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out.outputs[0].token_ids
        if not engine.has_unfinished_requests():
            break
    assert outs == {"a": refs[0][: first + 1], "b": refs[2]}
    assert sum(p.count("b") for p in prefills) == 1 and engine.blocks.num_used == 0


@pytest.mark.parametrize("seed, speculative", [(0, False), (1, False), (2, True)])
def test_random_traffic_gives_the_same_outputs_with_and_without_overlap(
    references, mtp_model, seed, speculative
):
    """Randomised traffic (prompt lengths, arrival steps, max_tokens, stop ids, n, greedy and seeded
    sampling, a cache small enough to preempt, some aborts), also with MTP speculation: every request
    that is not aborted ends with the same tokens and finish reason whether steps overlap or not,
    and no block is left held."""
    model = mtp_model if speculative else references[0]
    rng = torch.Generator().manual_seed(seed)

    def draw(hi: int) -> int:
        return int(torch.randint(0, hi, (1,), generator=rng))

    requests = []
    for i in range(24):
        prompt = torch.randint(0, 128, (1 + draw(18),), generator=rng).tolist()
        max_tokens = 1 + draw(16)
        params = SamplingParams(
            max_tokens=max_tokens, n=1 + (draw(4) == 0), stop_token_ids=[draw(128) for _ in range(draw(3))],
            temperature=0.0 if draw(2) else 0.9, seed=draw(1000), min_tokens=min(draw(3), max_tokens),
        )  # fmt: skip
        requests.append((draw(30), str(i), prompt, params, draw(6) == 0))  # arrival step, id, ..., aborted
    runs = []
    for overlap in (False, True):
        options = {"block_size": 4, "num_blocks": 24, "max_model_len": 44, "max_num_seqs": 6,
                   "speculative_tokens": int(speculative)}  # fmt: skip
        engine = LLMEngine(model, None, EngineConfig(async_scheduling=overlap, **options))
        overlapped = _counting_launches(engine)
        done, step = {}, 0
        while step < 40 or engine.has_unfinished_requests():
            for arrival, rid, prompt, params, aborted in requests:
                if arrival == step:
                    engine.add_request(rid, prompt, params)
                if aborted and arrival + 3 == step:
                    engine.abort_request(rid)
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = [(c.token_ids, c.finish_reason) for c in out.outputs]
            step += 1
        assert engine.blocks.num_used == 0 and engine.stats.preemptions > 0
        if overlap:
            assert sum(overlapped) > len(overlapped) // 3  # a good share of the steps overlapped
        else:
            assert not any(overlapped)
        runs.append({rid: done[rid] for _, rid, _, _, aborted in requests if not aborted})
    assert runs[0] == runs[1]


def test_abort_while_a_step_is_in_flight(references):
    """A request aborted while an overlapped step carries it: its blocks go at once, the step's
    output for it is dropped, and the others finish as if it had never been there."""
    model, prompts, refs = references
    engine = LLMEngine(model, None, EngineConfig(block_size=4, async_scheduling=True))
    for i in (0, 2):
        engine.add_request(str(i), prompts[i], GREEDY)
    engine.step()  # prefill; the first decode step is launched before it is read back
    engine.step()
    assert engine._inflight is not None
    engine.abort_request("2")
    outs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == "0"
            if out.finished:
                outs[0] = out.outputs[0].token_ids
    assert outs[0] == refs[0] and engine.blocks.num_used == 0


def test_requests_the_engine_cannot_serve_name_the_field(references):
    model = references[0]
    engine = LLMEngine(model, None, EngineConfig(max_model_len=32))
    cases = [
        ([], SamplingParams(), "prompt: is empty"),
        ([1, 500], SamplingParams(), "prompt: holds token ids outside"),
        (list(range(32)), SamplingParams(), "prompt: 32 tokens leave no room"),
        ([1, 2], SamplingParams(max_tokens=31), "max_tokens: 31 with a prompt of 2"),
        ([1, 2], SamplingParams(stop_token_ids=[128]), "stop_token_ids"),
        ([1, 2], SamplingParams(stop=["x"]), "stop: stop strings need a tokenizer"),
        ("text", SamplingParams(), "prompt: text needs a tokenizer"),
    ]
    for prompt, params, message in cases:
        with pytest.raises(RequestError, match=message):
            engine.add_request("x", prompt, params)
    assert not engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="max_model_len 300 exceeds"):
        LLMEngine(model, None, EngineConfig(max_model_len=300))
    with pytest.raises(ValueError, match="num_blocks: 1 blocks"):
        LLMEngine(model, None, EngineConfig(num_blocks=1))


# --- CUDA-graph semantics, emulated on the CPU ----------------------------------------------------------


class _ReplayedStep:
    """What a captured CUDA graph does, in Python: replay reruns the kernels over the same input
    buffers and writes the same output tensor; the Python around the capture (the runner's record of
    each shape's hidden states) ran once, at capture."""

    def __init__(self, fn, runner) -> None:
        self.fn, self.runner = fn, runner
        self.out = fn()  # the capture: its output is the graph's static output from now on

    def replay(self) -> None:
        recorded = dict(self.runner._hidden)
        fresh = self.fn()
        for out, value in zip(*((self.out, fresh) if isinstance(fresh, tuple) else ((self.out,), (fresh,))),
                              strict=True):  # fmt: skip
            out.copy_(value)
        self.runner._hidden.clear()
        self.runner._hidden.update(recorded)


def test_graph_semantics_static_outputs_and_fallback(mtp_model, monkeypatch, caplog):
    """Replayed steps that overwrite their static outputs (as CUDA graphs do) give the same greedy
    tokens, speculation and chunked prefill included; a capture that fails falls back to eager steps."""
    import importlib

    runner_module = importlib.import_module("dsv3.infer.engine.model_runner")
    prompts = _prompts()
    options = {"speculative_tokens": 1, "block_size": 4, "max_prefill_chunk": 5, "max_num_batched_tokens": 12}
    plain = run_staggered(LLMEngine(mtp_model, None, EngineConfig(**options)), prompts, GREEDY)
    engine = LLMEngine(mtp_model, None, EngineConfig(**options))
    runner = engine.runner
    captured = []

    def fake_capture(fn, pool):
        step = _ReplayedStep(fn, runner)
        captured.append(step)
        return step, step.out

    monkeypatch.setattr(runner_module, "capture", fake_capture)
    runner.graphs = True
    assert run_staggered(engine, prompts, GREEDY) == plain
    assert len(captured) > 4  # decode and short-prefill shapes, main and draft steps

    def failing_capture(fn, pool):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\n(details)")

    monkeypatch.setattr(runner_module, "capture", failing_capture)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    engine = LLMEngine(mtp_model, None, EngineConfig(**options))
    engine.runner.graphs = True
    with caplog.at_level("WARNING"):
        assert run_staggered(engine, prompts, GREEDY) == plain
    assert "running without CUDA graphs (capture of" in caplog.text and engine.runner.graphs is False
