"""HostCopy reads what the device computed up to the copy's point in the stream, waiting for nothing
queued after it."""

from __future__ import annotations

import pytest
import torch

from dsv3.host_copy import HostCopy


def test_a_copy_holds_the_values_at_its_point():
    tokens, flags = torch.tensor([3, 1, 4]), torch.tensor([True, False, True])
    copy = HostCopy({"tokens": tokens, "flags": flags})
    tokens.fill_(0)  # written after the copy's point: not what it reads
    got = copy.get()
    assert got["tokens"].tolist() == [3, 1, 4] and got["flags"].tolist() == [True, False, True]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run by hand on the GPU)")
def test_on_a_gpu_reading_does_not_wait_for_work_queued_after_the_copy():
    x = torch.randn(4096, 4096, device="cuda")
    tokens = (x[0] > 0).long()
    copy = HostCopy({"tokens": tokens})
    for _ in range(50):  # ~100 ms of work queued behind the copy, like the engine's next step
        x = x @ x / 64
    later = torch.cuda.Event()
    later.record()
    values = copy.get()["tokens"].tolist()
    assert not later.query(), "the read waited for work queued after the copy"
    torch.cuda.synchronize()
    assert values == tokens.tolist()
