"""The bounded row ops of expert parallelism's all-gather dispatcher: their reference implementations
against plain torch, rows past the bound never leaking into a result, and the Triton kernels (the CUDA
implementations) against the references under Triton's interpreter where Triton is installed."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dsv3.parallel.bounded_rows import (
    bounded_dot,
    bounded_gather,
    bounded_reduce,
    bounded_swiglu,
    bounded_swiglu_backward,
)

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
        "scale": torch.randn(P, generator=g), "ys": ys, "pos": torch.randint(0, P, (T, k), generator=g),
        "weight": torch.randn(T, k, generator=g), "other": torch.randn(T, d, generator=g),
        "gate_up": gate_up, "grad_h": torch.randn(P, inter, generator=g), "bound": torch.tensor(BOUND),
    }


def test_reference_ops_compute_their_definitions_and_ignore_rows_past_the_bound():
    c = _case()
    b, live = c["bound"], c["pos"] < BOUND
    assert torch.equal(bounded_gather(c["src"], c["index"], b)[:BOUND], c["src"][c["index"]][:BOUND])
    scaled = bounded_gather(c["src"], c["index"], b, c["scale"])[:BOUND]
    assert torch.allclose(scaled, (c["src"][c["index"]] * c["scale"][:, None])[:BOUND])
    rows = torch.where(live[..., None], c["ys"][c["pos"]], 0.0)  # (T, k, d), NaN rows dropped
    assert torch.allclose(bounded_reduce(c["ys"], c["pos"], b), rows.sum(1), atol=1e-6)
    weighted = bounded_reduce(c["ys"], c["pos"], b, c["weight"], torch.float32)
    assert torch.allclose(weighted, (rows * c["weight"][..., None]).sum(1), atol=1e-6)
    dots = bounded_dot(c["ys"], c["other"], c["pos"], b)
    assert torch.allclose(dots, (rows * c["other"][:, None]).sum(-1), atol=1e-5)
    assert not dots.isnan().any() and torch.equal(dots[~live], torch.zeros_like(dots[~live]))
    gate, up = c["gate_up"].chunk(2, -1)
    assert torch.allclose(bounded_swiglu(c["gate_up"], b)[:BOUND], (F.silu(gate) * up)[:BOUND])


def test_reference_swiglu_backward_is_autograd_s():
    c = _case()
    x = c["gate_up"][:BOUND].clone().requires_grad_()
    gate, up = x.chunk(2, -1)
    (F.silu(gate) * up).backward(c["grad_h"][:BOUND])
    got = bounded_swiglu_backward(c["gate_up"], c["grad_h"], c["bound"])[:BOUND]
    assert torch.allclose(got, x.grad, atol=1e-6)


def test_the_ops_trace_into_one_compiled_graph():
    """Custom ops with fake shapes: the dispatcher's compiled blocks keep no graph break around them."""
    c = _case()

    def f(src, index, ys, pos, weight, gate_up, bound):
        return (bounded_gather(src, index, bound).sum() + bounded_reduce(ys, pos, bound, weight).sum()
                + bounded_swiglu(gate_up, bound)[:BOUND].sum())

    args = (c["src"], c["index"], c["ys"], c["pos"], c["weight"], c["gate_up"], c["bound"])
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
        ("bounded_gather", (c["src"], c["index"], b, c["scale"]), BOUND),
        ("bounded_reduce", (c["ys"], c["pos"], b), None),
        ("bounded_reduce", (c["ys"], c["pos"], b, c["weight"], torch.float32), None),
        ("bounded_dot", (c["ys"], c["other"], c["pos"], b), None),
        ("bounded_swiglu", (c["gate_up"], b), BOUND),
        ("bounded_swiglu_backward", (c["gate_up"], c["grad_h"], b), BOUND),
    ]
    for name, args, rows in pairs:
        want, got = getattr(br, name)(*args), kernels[name](*args)
        want, got = (want, got) if rows is None else (want[:rows], got[:rows])
        assert not got.isnan().any(), name
        assert torch.allclose(got, want, atol=1e-5), (name, d, float((got - want).abs().max()))
print("ok")
'''


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_the_triton_kernels_equal_the_references_under_the_interpreter():
    """The CUDA implementations' kernels, run on CPU tensors by Triton's interpreter."""
    root = Path(__file__).resolve().parents[2]
    path = f"{root / 'src'}:{root}:{os.environ.get('PYTHONPATH', '')}"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    out = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
