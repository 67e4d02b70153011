"""The bounded row ops of expert parallelism's all-gather dispatcher: their reference implementations
against plain torch, rows past the bound never leaking into a result, and the Triton kernels (the CUDA
implementations) against the references under Triton's interpreter where Triton is installed."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3.parallel.bounded_rows import (
    bounded_gather,
    bounded_reduce,
    bounded_swiglu,
    bounded_swiglu_backward,
)
from tests.conftest import needs_triton, run_under_triton_interpreter

BOUND = 23  # of P = 40 rows


def _case(P: int = 40, T: int = 9, k: int = 4, d: int = 20, inter: int = 12, seed: int = 0) -> dict:
    """Inputs whose rows past the bound hold NaN, as uninitialized memory may."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.randn(P, d, generator=g)
    ys[BOUND:] = float("nan")
    gate_up = torch.randn(P, 2 * inter, generator=g)
    gate_up[BOUND:] = float("nan")
    return {
        "src": torch.randn(T, d, generator=g), "index": torch.randint(0, T, (P,), generator=g),
        "ys": ys, "pos": torch.randint(0, P, (T, k), generator=g), "w": torch.rand(P, 1, generator=g),
        "gate_up": gate_up, "grad_h": torch.randn(P, inter, generator=g), "bound": torch.tensor(BOUND),
    }


def test_reference_ops_compute_their_definitions_and_ignore_rows_past_the_bound():
    c = _case()
    b, live = c["bound"], c["pos"] < BOUND
    assert torch.equal(bounded_gather(c["src"], c["index"], b)[:BOUND], c["src"][c["index"]][:BOUND])
    rows = torch.where(live[..., None], c["ys"][c["pos"]], 0.0)  # (T, k, d), NaN rows dropped
    assert torch.allclose(bounded_reduce(c["ys"], c["pos"], b), rows.sum(1), atol=1e-6)
    assert bounded_reduce(c["ys"], c["pos"], b, torch.float64).dtype == torch.float64
    gate, up = c["gate_up"].chunk(2, -1)
    want = (c["w"] * F.silu(gate) * up)[:BOUND]
    assert torch.allclose(bounded_swiglu(c["gate_up"], c["w"], b)[:BOUND], want)


def test_reference_swiglu_backward_is_autograd_s_and_zero_for_other_ranks_weights():
    c = _case()
    x = c["gate_up"][:BOUND].clone().requires_grad_()
    w = c["w"][:BOUND].clone().requires_grad_()
    gate, up = x.chunk(2, -1)
    (w * F.silu(gate) * up).backward(c["grad_h"][:BOUND])
    d_gate_up, dw = bounded_swiglu_backward(c["gate_up"], c["w"], c["grad_h"], c["bound"])
    assert torch.allclose(d_gate_up[:BOUND], x.grad, atol=1e-6)
    assert torch.allclose(dw[:BOUND], w.grad, atol=1e-5)
    assert torch.equal(dw[BOUND:], torch.zeros_like(dw[BOUND:]))  # no NaN from the rows past the bound


def test_the_ops_trace_into_one_compiled_graph():
    """Custom ops with fake shapes: the dispatcher's compiled blocks keep no graph break around them."""
    c = _case()

    def f(src, index, ys, pos, gate_up, w, bound):
        return (bounded_gather(src, index, bound).sum() + bounded_reduce(ys, pos, bound).sum()
                + bounded_swiglu(gate_up, w, bound)[:BOUND].sum())

    args = (c["src"], c["index"], c["ys"], c["pos"], c["gate_up"], c["w"], c["bound"])
    assert torch.allclose(torch.compile(f, fullgraph=True, backend="eager")(*args), f(*args))


_INTERPRETED = '''
import os, torch
os.environ["TRITON_INTERPRET"] = "1"
from dsv3.parallel import bounded_rows as br
from tests.train.test_bounded_rows import _case, BOUND
kernels = br.triton_ops()
for d, inter in ((20, 12), (1100, 1030)):  # one column block, and two (blocks of 1024)
    c = _case(d=d, inter=inter)
    b = c["bound"]
    pairs = [
        ("bounded_gather", (c["src"], c["index"], b), BOUND),
        ("bounded_reduce", (c["ys"], c["pos"], b), None),
        ("bounded_reduce", (c["ys"].bfloat16(), c["pos"], b, torch.float32), None),
        ("bounded_swiglu", (c["gate_up"], c["w"], b), BOUND),
        ("bounded_swiglu_backward", (c["gate_up"], c["w"], c["grad_h"], b), BOUND),
    ]
    for name, args, rows in pairs:
        wants, gots = getattr(br, name)(*args), kernels[name](*args)
        if isinstance(wants, torch.Tensor):
            wants, gots = (wants,), (gots,)
        for i, (want, got) in enumerate(zip(wants, gots, strict=True)):
            live = rows if i == 0 else None  # the backward's dw: every row (0 past the bound)
            want, got = (want, got) if live is None else (want[:live], got[:live])
            assert not got.isnan().any(), name
            assert torch.allclose(got, want, atol=1e-4), (name, d, float((got - want).abs().max()))
print("ok")
'''


@needs_triton
def test_the_triton_kernels_equal_the_references_under_the_interpreter():
    """The CUDA implementations' kernels, run on CPU tensors by Triton's interpreter."""
    run_under_triton_interpreter(_INTERPRETED)
