"""ReadBack copies what the device computed up to its point in the stream and waits for nothing later."""

from __future__ import annotations

import pytest
import torch

from dsv3.infer.readback import ReadBack


def test_read_back_gives_the_tensors_values():
    tokens, flags = torch.tensor([3, 1, 4]), torch.tensor([True, False, True])
    read = ReadBack(tokens, flags)
    tokens.fill_(0)  # written after the read-back's point: not what it reads
    assert read.lists() == [[3, 1, 4], [True, False, True]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run by hand on the GPU)")
def test_on_a_gpu_reading_back_does_not_wait_for_work_queued_after_it():
    x = torch.randn(4096, 4096, device="cuda")
    tokens = (x[0] > 0).long()
    read = ReadBack(tokens, tokens > 0)
    for _ in range(50):  # ~100 ms of work queued behind the copy, like the next engine step
        x = x @ x / 64
    later = torch.cuda.Event()
    later.record()
    values, flags = read.lists()
    assert not later.query(), "the read waited for work queued after it"
    assert flags == [v > 0 for v in values]
    torch.cuda.synchronize()
    assert values == tokens.tolist()
