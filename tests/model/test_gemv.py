"""One-row linears become reductions only while compiling without gradients, with F.linear's result."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3.model.gemv import Linear, few_compiled_rows, linear
from tests.conftest import traced_ops


def test_one_row_compiled_without_gradients_is_a_reduction_equal_to_f_linear():
    torch.manual_seed(0)
    w = torch.randn(48, 32)
    one, two = torch.randn(1, 1, 32), torch.randn(2, 1, 32)
    with torch.no_grad():
        assert F.linear not in traced_ops(linear, one, w)  # the product-and-sum form
        assert F.linear in traced_ops(linear, two, w)  # two sequences: the GEMM
        compiled = torch.compile(linear)(one, w)
    assert F.linear in traced_ops(linear, one, w)  # gradients recorded: the GEMM
    torch.testing.assert_close(compiled, F.linear(one, w), rtol=1e-6, atol=1e-6)
    assert torch.equal(linear(one, w), F.linear(one, w))  # eagerly: F.linear itself


def test_linear_module_keeps_nn_linear_parameters_and_state_dict():
    lin = Linear(8, 4)
    assert isinstance(lin, torch.nn.Linear) and lin.bias is None
    assert list(lin.state_dict()) == ["weight"]
    x = torch.randn(3, 8)
    assert torch.equal(lin(x), F.linear(x, lin.weight))


def test_one_sequences_two_rows_reduce_but_two_sequences_and_longer_chunks_keep_the_gemm():
    """A speculative verify step, x (1, 2, in), computes its rows as the one-token step does; a
    flattened or multi-sequence input keeps F.linear (its row count varies within a compiled graph)."""
    torch.manual_seed(0)
    w = torch.randn(48, 32)
    with torch.no_grad():
        verify = torch.randn(1, 2, 32)
        assert F.linear not in traced_ops(linear, verify, w)
        for x in (torch.randn(2, 1, 32), torch.randn(1, 3, 32), torch.randn(2, 32)):
            assert F.linear in traced_ops(linear, x, w), tuple(x.shape)
        torch._dynamo.reset()
        compiled = torch.compile(linear)(verify, w)
        assert not few_compiled_rows(verify)  # eagerly: never
    torch.testing.assert_close(compiled, F.linear(verify, w), rtol=1e-6, atol=1e-6)
