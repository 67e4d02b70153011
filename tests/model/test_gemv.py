"""One-row linears become reductions only while compiling without gradients, with F.linear's result."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3.model.gemv import Linear, linear
from tests.conftest import traced_ops


def test_one_row_compiled_without_gradients_is_a_reduction_equal_to_f_linear():
    torch.manual_seed(0)
    w = torch.randn(48, 32)
    one, two = torch.randn(1, 1, 32), torch.randn(1, 2, 32)
    with torch.no_grad():
        assert F.linear not in traced_ops(linear, one, w)  # the product-and-sum form
        assert F.linear in traced_ops(linear, two, w)  # more rows: the GEMM
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
