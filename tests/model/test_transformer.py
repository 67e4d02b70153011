"""The decoder: losses, MTP, checkpointing, compilation, init, parameter counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dsv3.config import load_model_config, preset_names
from dsv3.model.transformer import IGNORE_INDEX, Transformer
from dsv3.scaling import count_params


def _model(cfg, seed: int = 0, scale: float = 10.0) -> Transformer:
    """A model whose init is widened so logits and routing are far from uniform."""
    model = Transformer(cfg, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(scale)
    return model


def _batch(cfg, B: int = 2, T: int = 12, seed: int = 0):
    ids = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(seed))
    return ids[:, :-1], ids[:, 1:].clone()


def test_losses_match_their_definitions(make_config):
    cfg = make_config(num_nextn_predict_layers=2)
    model = _model(cfg)
    ids, labels = _batch(cfg)
    labels[0, :3] = IGNORE_INDEX
    out = model.forward_with_losses(ids, labels, mtp_lambda=0.3, balance_alpha=0.01)
    assert torch.allclose(out.lm_loss, F.cross_entropy(out.logits.flatten(0, 1), labels.flatten()))
    # MTP depth d at position t predicts labels[t + d] (token t + d + 1)
    mtp_logits = model.mtp_logits(ids)
    for d in (1, 2):
        target = labels[:, d:]
        expected = F.cross_entropy(mtp_logits[d - 1][:, : ids.shape[1] - d].flatten(0, 1), target.flatten())
        assert torch.allclose(out.mtp_losses[d - 1], expected, atol=1e-5)
    assert torch.allclose(out.mtp_loss, 0.3 * out.mtp_losses.mean())
    assert out.balance_loss > 0
    assert torch.allclose(out.loss, out.lm_loss + out.mtp_loss + out.balance_loss)


def test_extras_are_skipped_unless_asked(make_config):
    cfg = make_config()
    model = _model(cfg)
    ids, labels = _batch(cfg)
    out = model.forward_with_losses(ids, labels, return_logits=False)
    assert out.mtp_loss is None and out.mtp_losses is None and out.balance_loss is None and out.logits is None
    assert torch.equal(out.loss, out.lm_loss)
    assert torch.allclose(model(ids), model.forward_with_losses(ids, labels).logits)


def test_mtp_is_finite_when_no_position_has_a_target(make_config):
    cfg = make_config(num_nextn_predict_layers=2)
    ids, labels = _batch(cfg, T=1)
    out = _model(cfg).forward_with_losses(ids, labels, mtp_lambda=0.3)
    assert torch.isfinite(out.loss) and torch.equal(out.mtp_losses, torch.zeros(2))


def test_mtp_depth_sees_the_next_token(make_config):
    """Changing token t+1 changes MTP depth 1's prediction at t but not the main head's."""
    cfg = make_config()
    model = _model(cfg)
    ids, _ = _batch(cfg, B=1, T=8)
    ids2 = ids.clone()
    ids2[0, 5] = (ids[0, 5] + 1) % cfg.vocab_size
    with torch.no_grad():
        main, main2 = model(ids), model(ids2)
        mtp, mtp2 = model.mtp_logits(ids)[0], model.mtp_logits(ids2)[0]
    assert torch.equal(main[:, :5], main2[:, :5])
    assert not torch.allclose(mtp[:, 4], mtp2[:, 4])
    assert torch.equal(mtp[:, :4], mtp2[:, :4])


class _CountMatmuls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default,
                               torch.ops.aten.bmm.default)
        return func(*args, **(kwargs or {}))


def test_activation_checkpointing_gives_the_same_gradients(make_config):
    """Whole and selective recomputation give the plain gradients; selective remakes no GEMM (its
    backward runs as many as the plain one), whole recomputation remakes them all."""
    cfg = make_config()
    ids, labels = _batch(cfg)
    grads, matmuls = [], []
    for ckpt in (False, True, "selective"):
        model = _model(cfg, seed=1)
        model.activation_checkpointing = ckpt
        out = model.forward_with_losses(ids, labels, mtp_lambda=0.3, balance_alpha=0.01)
        with _CountMatmuls() as counter:
            out.loss.backward()
        matmuls.append(counter.count)
        grads.append({n: p.grad for n, p in model.named_parameters()})
        load = model.expert_load()
        assert load.sum(1).eq(ids.numel() * cfg.num_experts_per_tok).all()  # recompute does not double count
    for other in grads[1:]:
        for name, g in grads[0].items():
            assert torch.allclose(g, other[name], atol=1e-6), name
    plain, whole, selective = matmuls
    assert selective == plain < whole


@pytest.mark.parametrize("chunk", [5, 16, 1000])  # ragged last chunk, even chunks, one chunk
def test_chunked_loss_gives_the_same_losses_and_gradients(make_config, chunk):
    """`loss_chunk_tokens` (logits made a chunk at a time, their gradients with them) against whole
    logits, main and MTP losses, padding targets included."""
    cfg = make_config()
    ids, labels = _batch(cfg)
    labels[0, -3:] = -100
    outs, grads = [], []
    rows = []  # positions per chunk of logits
    for tokens in (0, chunk):
        model = _model(cfg, seed=1)
        model.loss_chunk_tokens = tokens
        if tokens:
            def counted(logits, t, fn=model._chunk_loss):
                rows.append(logits.shape[0])
                return fn(logits, t)

            model._chunk_loss = counted
            model.lm_head.register_forward_hook(lambda *_: pytest.fail("the head made whole logits"))
        out = model.forward_with_losses(ids, labels, mtp_lambda=0.3, balance_alpha=0.01, return_logits=False)
        out.loss.backward()
        outs.append(out)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert max(rows) == min(chunk, ids.numel())  # never the whole logits at once
    assert len(rows) == (1 + cfg.num_nextn_predict_layers) * -(-ids.numel() // chunk)  # made once, not remade
    plain, chunked = outs
    assert torch.allclose(plain.lm_loss, chunked.lm_loss, rtol=1e-6)
    assert torch.allclose(plain.mtp_losses, chunked.mtp_losses, rtol=1e-6)
    for name, g in grads[0].items():  # float32 rounding: the softmax's gradient is computed another way
        assert (g - grads[1][name]).abs().max() <= 1e-5 * g.abs().max(), name
    # logits wanted: the whole head, whatever the setting
    model = _model(cfg, seed=1)
    model.loss_chunk_tokens = chunk
    model.eval()
    with torch.no_grad():
        wanted = model.forward_with_losses(ids, labels, return_logits=True)
        assert wanted.logits is not None and torch.allclose(wanted.lm_loss, model.forward_with_losses(
            ids, labels, return_logits=False).lm_loss, rtol=1e-6)


def test_moe_block_compiles_without_graph_breaks(make_config):
    """The training path of a block (MLA + MoE + balance loss) traces as one graph, forward and backward."""
    layer = 1
    cfg = make_config()
    model = _model(cfg)
    block = model.model.layers[layer]
    x = torch.randn(2, 16, cfg.hidden_size, requires_grad=True)
    cos, sin = model.rope(torch.arange(16))
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)  # raises on any graph break
    for fn in (block, compiled):
        y, aux = fn(x, cos, sin, layer == 1)
        loss = y.square().mean() + (aux if aux is not None else 0)
        loss.backward()
        if fn is block:
            eager_y, eager_grad = y.detach(), x.grad.clone()
            x.grad = None
    assert torch.allclose(y, eager_y, atol=1e-5) and torch.allclose(x.grad, eager_grad, atol=1e-5)


def test_init_is_deterministic_and_device_free(make_config):
    cfg = make_config()
    a, b, c = Transformer(cfg, seed=7), Transformer(cfg, seed=7), Transformer(cfg, seed=8)
    for (name, pa), pb, pc in zip(
        a.state_dict().items(), b.state_dict().values(), c.state_dict().values(), strict=True
    ):
        assert torch.equal(pa, pb), name
        if pa.dim() > 1:
            assert not torch.equal(pa, pc), name
    with torch.device("meta"):
        lazy = Transformer(cfg, seed=7)
    lazy.to_empty(device="cpu")
    lazy.init_weights(seed=7)
    for (name, pa), pl in zip(a.state_dict().items(), lazy.state_dict().values(), strict=True):
        assert torch.equal(pa, pl), name
    w = a.model.layers[1].mlp.experts.gate_up_proj
    assert abs(w.std().item() - 0.006) < 3e-4 and abs(w.mean().item()) < 3e-4
    assert torch.equal(a.model.norm.weight, torch.ones(cfg.hidden_size))


def test_bf16_keeps_rope_and_router_bias_exact(make_config):
    cfg = make_config(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
    model = Transformer(cfg).to(torch.bfloat16)
    assert model.rope_inv_freq.dtype == torch.float32
    assert torch.equal(model.rope_inv_freq, Transformer(cfg).rope_inv_freq)
    assert all(m.gate.e_score_correction_bias.dtype == torch.float32 for m in model.moe_layers())
    ids, labels = _batch(cfg)
    out = model.forward_with_losses(ids, labels, mtp_lambda=0.3)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)


def test_update_bias_reaches_every_moe_layer(make_config):
    cfg = make_config(num_nextn_predict_layers=1, first_k_dense_replace=1)
    model = _model(cfg)
    ids, labels = _batch(cfg)
    model.forward_with_losses(ids, labels, mtp_lambda=0.3)
    layers = list(model.moe_layers())
    assert len(layers) == cfg.num_hidden_layers - 1 + 1  # main MoE layers + the MTP block
    model.update_bias(0.01)
    for moe in layers:
        load = moe.tokens_per_expert.float()
        expected = 0.01 * torch.sign(load.mean() - load)
        assert torch.allclose(moe.gate.e_score_correction_bias, expected)


@pytest.mark.parametrize("preset", preset_names())
def test_plan_counts_equal_the_model_on_meta(preset):
    cfg = load_model_config(preset)
    with torch.device("meta"):
        model = Transformer(cfg)
    counts = count_params(cfg)
    assert model.num_params() == counts.total
    assert model.num_params(mtp=True) == counts.total_with_mtp


def test_deepseek_v3_count_equals_transformers():
    import transformers
    cfg = load_model_config("deepseek-v3")
    with torch.device("meta"):
        ours = Transformer(cfg)
        theirs = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**cfg.to_hf_dict()))
    total = ours.num_params()
    assert total == sum(p.numel() for p in theirs.parameters())
    assert 670e9 < total < 672e9  # the published 671B, MTP excluded
    assert 36e9 < count_params(cfg).active < 38e9


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True, "selective"])
def test_compiled_model_trains_like_eager(make_config, checkpointing):
    """compile_blocks (every block with its checkpoint, and the head's loss, fullgraph) keeps the losses,
    the grads and the expert loads the bias update reads (a buffer written inside the checkpoint)."""
    cfg = make_config()
    ids, labels = _batch(cfg)
    results = []
    for compiled in (False, True):
        model = _model(cfg, seed=2)
        model.activation_checkpointing = checkpointing
        if compiled:
            torch._dynamo.reset()
            model.compile_blocks()
        out = model.forward_with_losses(ids, labels, mtp_lambda=0.3, balance_alpha=0.01)
        out.loss.backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters()}, model.expert_load().clone()))
    (eager, eager_grads, eager_load), (comp, comp_grads, comp_load) = results
    for a, b in ((eager.loss, comp.loss), (eager.logits, comp.logits), (eager.mtp_losses, comp.mtp_losses)):
        assert torch.allclose(a, b, atol=1e-5)
    for name, g in eager_grads.items():
        assert torch.allclose(g, comp_grads[name], atol=1e-5), name
    assert torch.equal(eager_load, comp_load) and comp_load.sum() > 0


def test_the_models_own_methods_never_call_its_public_entry_points(make_config):
    """FSDP gathers the root's weights around `hidden_states` (generation and evaluation call it), so the
    training forward must not go through it: a nested FSDP entry point frees the head's gathered weight
    before the backward uses it (on the GPU: "setStorage ... storage of size 0")."""
    model = Transformer(make_config(num_nextn_predict_layers=1), seed=0)

    def entry_point(*args, **kwargs):
        raise AssertionError("hidden_states called from inside the model")

    model.hidden_states = entry_point  # what register_fsdp_forward_method does: an instance attribute
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    out = model.forward_with_losses(ids[:, :-1], ids[:, 1:], mtp_lambda=0.3, balance_alpha=1e-4)
    out.loss.backward()
    model(ids)
    model.mtp_logits(ids)


@pytest.mark.parametrize("q_lora", [True, False], ids=["q_lora", "plain_q"])
def test_packed_input_projections_compute_the_same_and_store_nothing_twice(make_config, q_lora):
    """`pack_for_inference`: one GEMM per pair of linears reading the same input (MLA's first query
    projection and kv_a, every SwiGLU's gate and up); logits unchanged, parameters still themselves."""
    cfg = make_config() if q_lora else make_config().model_copy(update={"q_lora_rank": None})
    model = Transformer(cfg, seed=0).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        model.pack_for_inference()
        after = model(ids)
    assert (after - before).abs().max() < 1e-5  # measured 0 on CPU
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    attn = model.model.layers[0].self_attn
    first = attn.q_a_proj if q_lora else attn.q_proj
    shared = model.model.layers[-1].mlp.shared_experts
    def storage(t: torch.Tensor) -> int:
        return t.untyped_storage().data_ptr()

    assert storage(first.weight) == storage(attn.kv_a_proj_with_mqa.weight) == storage(attn.packed_inputs)
    gate_up = shared.gate_proj, shared.up_proj
    assert storage(gate_up[0].weight) == storage(gate_up[1].weight) == storage(shared.packed_gate_up)
    model(ids).sum().backward()  # recording gradients: the linears one by one, which still train
    assert first.weight.grad is not None and gate_up[1].weight.grad is not None


def test_packing_again_keeps_the_packed_weights_that_still_hold_the_linears(make_config):
    """A second engine over the same model packs it again: the first packing must survive (CUDA graphs
    captured by the first engine read it; packing anew freed it, seen as an illegal memory access on
    the H200), and only weights moved off it since are packed anew."""
    model = Transformer(make_config(), seed=0).eval()
    model.pack_for_inference()
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    first = (attn.packed_inputs, mlp.packed_gate_up)
    model.pack_for_inference()
    assert attn.packed_inputs is first[0] and mlp.packed_gate_up is first[1]
    model.to(torch.float64)  # new parameter tensors: the old packing no longer holds them
    model.pack_for_inference()
    assert attn.packed_inputs is not first[0] and attn.packed_inputs.dtype == torch.float64
    storage = attn.kv_a_proj_with_mqa.weight.untyped_storage()
    assert storage.data_ptr() == attn.packed_inputs.untyped_storage().data_ptr()
