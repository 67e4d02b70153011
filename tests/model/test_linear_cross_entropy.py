"""linear_cross_entropy (chunked logits, gradients made in the forward) against whole logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsv3.model.linear_cross_entropy import IGNORE_INDEX, chunk_loss_and_grad, linear_cross_entropy


def _inputs(M: int = 23, d: int = 16, V: int = 50, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(M, d, generator=g).requires_grad_()
    w = (torch.randn(V, d, generator=g) * 0.5).requires_grad_()
    t = torch.randint(0, V, (M,), generator=g)
    t[3::7] = IGNORE_INDEX  # a few ignored positions
    return h, w, t


def _whole(h, w, t):
    return F.cross_entropy(F.linear(h, w).float(), t, ignore_index=IGNORE_INDEX)


def _grads(loss_fn, h, w, t, scale: float = 1.0):
    h.grad = w.grad = None
    loss = loss_fn(h, w, t)
    (scale * loss).backward()
    return loss.detach(), h.grad.clone(), w.grad.clone()


@pytest.mark.parametrize("chunk", [1, 7, 23, 100])  # a row a chunk, ragged, exact, one chunk
def test_equals_whole_logits_in_float32(chunk):
    h, w, t = _inputs()
    ref = _grads(_whole, h, w, t)
    got = _grads(lambda *a: linear_cross_entropy(*a, chunk), h, w, t)
    for a, b in zip(ref, got, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_the_backward_scales_by_the_incoming_gradient():
    """Gradients are made in the forward; a loss weighted in the total (MTP's λ) must scale them."""
    h, w, t = _inputs()
    ref = _grads(_whole, h, w, t, scale=0.3)
    got = _grads(lambda *a: linear_cross_entropy(*a, 5), h, w, t, scale=0.3)
    for a, b in zip(ref[1:], got[1:], strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_ignored_targets_give_zero_not_nan():
    h, w, t = _inputs(M=8)
    t[:] = IGNORE_INDEX
    loss, gh, gw = _grads(lambda *a: linear_cross_entropy(*a, 3), h, w, t)
    assert loss == 0 and not gh.any() and not gw.any()


def test_only_the_inputs_that_want_gradients_get_them():
    h, w, t = _inputs()
    w.requires_grad_(False)
    linear_cross_entropy(h, w, t, 5).backward()
    assert h.grad is not None and w.grad is None


def test_without_gradients_it_only_computes_the_loss():
    h, w, t = _inputs()
    with torch.no_grad():
        assert torch.allclose(linear_cross_entropy(h, w, t, 4), _whole(h, w, t), rtol=1e-6)


def test_bf16_autocast_runs_the_gemms_in_bf16_like_the_head():
    """Under autocast the chunks' GEMMs run in bf16, as `nn.Linear` would; gradients come back in the
    parameters' float32."""
    h, w, t = _inputs(M=64, d=32, V=200)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _grads(_whole, h, w, t)
        got = _grads(lambda *a: linear_cross_entropy(*a, 16), h, w, t)
    exact = _grads(_whole, h, w, t)
    assert got[1].dtype == got[2].dtype == torch.float32
    for a, b, e in zip(ref, got, exact, strict=True):
        scale = e.abs().max()
        assert (b - a).abs().max() <= 2e-2 * scale  # bf16 rounding, as large as autocast's own
        assert (b - e).abs().max() <= 2e-2 * scale


def test_a_shape_mismatch_names_both_counts():
    h, w, t = _inputs()
    with pytest.raises(ValueError, match="23 hidden states for 22 targets"):
        linear_cross_entropy(h, w, t[:-1], 4)


def test_the_compiled_chunk_function_gives_the_eager_results():
    """`Transformer.compile_blocks` compiles `chunk_loss_and_grad` in one graph (fullgraph)."""
    h, w, t = _inputs()
    compiled = torch.compile(chunk_loss_and_grad, fullgraph=True)
    ref = _grads(lambda *a: linear_cross_entropy(*a, 7), h, w, t)
    got = _grads(lambda *a: linear_cross_entropy(*a, 7, compiled), h, w, t)
    for a, b in zip(ref, got, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
