"""FP8 GEMMs: linears with DeepSeek-V3's 1×128 / 128×128 scaling and the routed experts' rowwise
scaling (the CPU path: the GPU's quantized values and scales, multiplied in float32).

The reference quantizes tile by tile (or row by row) in plain loops (one amax, one scale, one cast
per tile) and multiplies in float64: an independent statement of the scheme the vectorised code must
compute.
"""

from __future__ import annotations

import pytest
import torch

from dsv3.config import ConfigError, load_run_config
from dsv3.model import Transformer
from dsv3.model.fp8 import quantize_blocks
from dsv3.model.fp8_experts import fp8_expert_matmul
from dsv3.model.fp8_linear import (
    FP8_TILE,
    Fp8Linear,
    convert_to_fp8,
    fp8_linear,
    quantize_tiles,
)
from dsv3.model.gemv import Linear
from dsv3.model.moe import Experts
from dsv3.train.trainer import Trainer
from tests.conftest import FIXTURE_TEXT, byte_documents, micro_run, write_shard

E4M3_MAX = 448.0


def _tile_roundtrip(t: torch.Tensor) -> torch.Tensor:
    """One tile (any shape) → its FP8 values times its scale (float32 arithmetic, as specified)."""
    scale = t.float().abs().max().clamp_min(1e-12) / E4M3_MAX
    q = (t.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return (q.float() * scale).double()


def _rows_ref(x: torch.Tensor) -> torch.Tensor:
    """x (M, K) through 1×128 tiles along its rows."""
    out = torch.empty_like(x, dtype=torch.float64)
    for i in range(x.shape[0]):
        for j in range(0, x.shape[1], FP8_TILE):
            out[i, j : j + FP8_TILE] = _tile_roundtrip(x[i, j : j + FP8_TILE])
    return out


def _blocks_ref(w: torch.Tensor) -> torch.Tensor:
    """w (N, K) through 128×128 blocks (the last block row may be short)."""
    out = torch.empty_like(w, dtype=torch.float64)
    for i in range(0, w.shape[0], FP8_TILE):
        for j in range(0, w.shape[1], FP8_TILE):
            out[i : i + FP8_TILE, j : j + FP8_TILE] = _tile_roundtrip(w[i : i + FP8_TILE, j : j + FP8_TILE])
    return out


def test_tiles_keep_each_value_within_half_a_step_of_its_tile():
    torch.manual_seed(0)
    x = torch.randn(5, 256) * torch.logspace(-3, 3, 256)  # one outlier scale per tile would crush the rest
    q, scale = quantize_tiles(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (5, 2)
    back = q.float() * scale.repeat_interleave(FP8_TILE, 1)
    # e4m3's widest step is 32 (values 256–448): half of it, in the tile's scale, bounds every error
    assert ((back - x).abs() <= 16 * scale.repeat_interleave(FP8_TILE, 1) + 1e-30).all()
    assert torch.equal(back.double(), _rows_ref(x))
    assert q.float().abs().amax(-1).eq(E4M3_MAX).all()  # each tile's largest value maps to 448


def test_blocks_pad_rows_with_zeros_and_match_the_loop_reference():
    torch.manual_seed(1)
    w = torch.randn(200, 256)
    q, scale = quantize_blocks(w)
    assert q.shape == (256, 256) and scale.shape == (2, 2)
    assert q[200:].float().abs().max() == 0
    back = q.float()[:200] * scale.repeat_interleave(FP8_TILE, 0)[:200].repeat_interleave(FP8_TILE, 1)
    assert torch.equal(back.double(), _blocks_ref(w))


def test_tiles_need_whole_tiles_and_blocks_pad_both_sides():
    with pytest.raises(ValueError, match="not a multiple of 128"):
        quantize_tiles(torch.randn(4, 100))
    q, scale = quantize_blocks(torch.randn(4, 100))
    assert q.shape == (128, 128) and scale.shape == (1, 1) and q[:, 100:].float().abs().max() == 0


@pytest.mark.parametrize(("tokens", "out_features"), [(256, 384), (100, 200)])  # whole tiles, and padded
def test_forward_and_backward_compute_the_quantized_products(tokens, out_features):
    """y = Q(x)·Q(W)ᵀ, dx = Q(dy)·Q(W), dW = Q(dyᵀ)·Q(xᵀ)ᵀ (Q: tiles along each product's contraction)."""
    torch.manual_seed(2)
    x = torch.randn(tokens, 256, requires_grad=True)
    w = (torch.randn(out_features, 256) * 0.05).requires_grad_()
    dy = torch.randn(tokens, out_features)
    y = fp8_linear(x, w)
    y.backward(dy)
    qw = _blocks_ref(w.detach())
    # float32 sums against float64 ones
    torch.testing.assert_close(y.double(), _rows_ref(x.detach()) @ qw.t(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(x.grad.double(), _rows_ref(dy) @ qw, rtol=1e-5, atol=1e-4)
    dw = _rows_ref(dy.t().contiguous()) @ _rows_ref(x.detach().t().contiguous()).t()
    torch.testing.assert_close(w.grad.double(), dw, rtol=1e-5, atol=1e-4)
    # and near the exact products: e4m3 keeps 3 mantissa bits
    exact = x.detach() @ w.detach().t()
    assert ((y - exact).norm() / exact.norm()).item() < 0.06


def test_autocast_output_and_the_module_swap():
    torch.manual_seed(3)
    layer = Linear(256, 128)
    reference = layer(torch.ones(2, 3, 256))
    model = torch.nn.Sequential(layer, Linear(100, 128), torch.nn.Linear(128, 128))
    kept = convert_to_fp8(model)
    assert kept == ["1"]  # 100 input features: not whole tiles; the plain nn.Linear is not ours
    assert type(model[0]) is Fp8Linear and type(model[1]) is Linear and type(model[2]) is torch.nn.Linear
    assert list(model[0].state_dict()) == ["weight"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model[0](torch.ones(2, 3, 256))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3, 128)
    assert ((out.float() - reference).norm() / reference.norm()).item() < 0.06


ALIGNED = (  # every linear's input features whole 128-wide tiles (shared expert down: 128)
    "model.hidden_size=128", "model.intermediate_size=256", "model.moe_intermediate_size=128",
    "model.q_lora_rank=128", "model.kv_lora_rank=128", "model.qk_nope_head_dim=64",
    "model.qk_rope_head_dim=32", "model.v_head_dim=64",
)


def test_fp8_training_follows_float32(tmp_path):
    """The trainer with `train.fp8` on CPU: the same run as float32 within FP8's precision, learning."""
    docs = byte_documents(FIXTURE_TEXT.read_text(encoding="utf-8"))
    shard = write_shard(tmp_path / "train" / "shard_00000", docs).parent
    losses = {}
    for fp8 in (False, True):
        records: list[dict] = []
        cfg = micro_run(tmp_path / f"fp8-{fp8}", shard, None, *ALIGNED, f"train.fp8={fp8}",
                        "train.save_every=0", "train.eval_every=100", "data.valid_fraction=0.1")
        trainer = Trainer(cfg, on_record=records.append)
        trainer.fit()
        losses[fp8] = [r["loss"] for r in records if r["kind"] == "train"]
        assert any(isinstance(m, Fp8Linear) for m in trainer.model.modules()) == fp8
    assert len(losses[True]) == len(losses[False]) == 12
    assert losses[True] == pytest.approx(losses[False], rel=0.02)
    assert losses[True][-1] < losses[True][0] - 1.0


def test_fp8_with_compile_on_cpu_is_refused(tmp_path):
    docs = byte_documents(FIXTURE_TEXT.read_text(encoding="utf-8"))
    shard = write_shard(tmp_path / "train" / "shard_00000", docs).parent
    cfg = micro_run(tmp_path / "run", shard, None, *ALIGNED, "train.fp8=true", "train.compile=true")
    with pytest.raises(ConfigError, match="train.fp8 with train.compile needs train.device cuda"):
        Trainer(cfg)


def _row_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """Each row through FP8 with its own scale (the routed experts' rowwise scheme)."""
    return torch.stack([_tile_roundtrip(row) for row in x.reshape(-1, x.shape[-1])]).view(x.shape)


def test_expert_products_are_the_rowwise_quantized_ones():
    """Forward x·W_eᵀ and dgrad dy·W_e from rowwise-quantized operands (x and dy per token, W per
    expert row for the forward and per expert column for dgrad); wgrad dy_eᵀ·x_e unquantized."""
    torch.manual_seed(4)
    ends = torch.tensor([5, 5, 12, 20])  # expert 1 receives nothing
    x = torch.randn(20, 64, requires_grad=True)
    w = (torch.randn(4, 48, 64) * 0.1).requires_grad_()
    dy = torch.randn(20, 48)
    y = fp8_expert_matmul(x, w, ends)
    y.backward(dy)
    starts = [0, *ends[:-1].tolist()]
    qx, qdy, qw = _row_roundtrip(x.detach()), _row_roundtrip(dy), _row_roundtrip(w.detach())
    qwt = _row_roundtrip(w.detach().transpose(1, 2)).transpose(1, 2)  # per expert column
    for e, (a, b) in enumerate(zip(starts, ends.tolist(), strict=True)):
        torch.testing.assert_close(y[a:b].double(), qx[a:b] @ qw[e].t(), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(x.grad[a:b].double(), qdy[a:b] @ qwt[e], rtol=1e-5, atol=1e-4)
        exact = dy[a:b].t().double() @ x.detach()[a:b].double()
        torch.testing.assert_close(w.grad[e].double(), exact, rtol=1e-5, atol=1e-4)
    assert w.grad[1].abs().max() == 0


def test_conversion_makes_the_routed_experts_fp8():
    cfg = load_run_config("tiny", list(ALIGNED)).model
    model = Transformer(cfg)
    convert_to_fp8(model)
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    assert experts and all(e.matmul is fp8_expert_matmul for e in experts)


@pytest.mark.parametrize("tokens, in_features, out_features", [(300, 640, 1024), (4096, 1024, 576)])
def test_gpu_calls_pass_torchs_layout_checks(tokens, in_features, out_features):
    """On meta tensors the products take the GPU path (`F.scaled_mm`, `_scaled_grouped_mm`), whose
    meta functions check scale shapes and strides as cuBLAS does: the layouts
    are checked here without a GPU (K/128 = 5 needs the block scales padded to 8 rows; 576 outputs
    are padded to whole blocks), eagerly and traced by torch.compile in one graph."""
    from dsv3.model.fp8_experts import _Fp8ExpertMatmul
    from dsv3.model.fp8_linear import _Fp8LinearFunction

    def grads(fn, x, w, *extra):
        shapes = []
        for run in (fn, torch.compile(fn, backend="aot_eager", fullgraph=True)):  # no graph break either
            xi, wi = x.detach().requires_grad_(), w.detach().requires_grad_()
            y = run(xi, wi, *extra)
            y.backward(torch.empty_like(y))
            shapes.append((y.shape, xi.grad.shape, wi.grad.shape))
        assert shapes[0] == shapes[1]
        return shapes[0]

    meta = {"device": "meta", "dtype": torch.bfloat16}
    x = torch.empty(tokens, in_features, **meta)
    w = torch.empty(out_features, in_features, device="meta")
    assert grads(_Fp8LinearFunction.apply, x, w, torch.bfloat16) == (
        (tokens, out_features), x.shape, w.shape)  # fmt: skip
    experts = torch.empty(4, out_features, in_features, **meta)
    ends = torch.empty(4, device="meta", dtype=torch.int64)
    x = torch.empty(tokens, in_features, **meta)
    assert grads(_Fp8ExpertMatmul.apply, x, experts, ends) == (
        (tokens, out_features), x.shape, experts.shape)  # fmt: skip


def test_expert_weight_gradient_takes_any_layout():
    """The GPU path's weight gradient (one bf16 grouped GEMM over the tokens) equals each expert's
    dy_eᵀ·x_e, whatever the strides it is handed (a transposed dy is laid out again inside)."""
    from dsv3.model.fp8_experts import _grouped_weight_grad

    torch.manual_seed(5)
    ends = torch.tensor([16, 16, 40, 64], dtype=torch.int32)  # an empty expert
    x = torch.randn(64, 32, dtype=torch.bfloat16)
    dy = torch.randn(48, 64, dtype=torch.bfloat16).t()  # (64, 48), token dimension contiguous
    dw = _grouped_weight_grad(dy, x, ends)
    starts = [0, *ends[:-1].tolist()]
    for e, (a, b) in enumerate(zip(starts, ends.tolist(), strict=True)):
        exact = dy[a:b].double().t() @ x[a:b].double()
        torch.testing.assert_close(dw[e].double(), exact, rtol=1e-2, atol=1e-2)
