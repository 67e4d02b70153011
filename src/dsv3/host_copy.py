"""Tensors copied from the GPU to the host without waiting for everything queued on the device.

Reading a CUDA tensor on the host (`.item()`, `.tolist()`, `bool(t)`, `.cpu()`) blocks the Python
thread until the GPU has run everything queued so far, and the GPU then idles while the host prepares
the next step. Instead, a copy into pinned host memory is queued behind the work that produced the
tensors (so later in-place updates cannot reach it), an event marks that point of the stream, and
reading waits for that event only, not for work queued after it: the trainer reads a step's numbers
a step later, a background checkpoint's thread reads the snapshot of the weights and optimizer
state before it writes them, and the serving engine reads a step's sampled tokens while the step
that async scheduling launched behind it runs.
"""

from __future__ import annotations

import torch

__all__ = ["HostCopy"]


class HostCopy:
    """Device tensors on their way to host memory; `get()` waits for the copy (only) when it is read.

    `buffers` keeps the pinned host tensors between copies of same-shaped tensors (pinning gigabytes
    takes seconds): pass the same dict each time, and read a copy before the next one is made."""

    def __init__(
        self, tensors: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor] | None = None
    ) -> None:
        self._event: torch.cuda.Event | None = None
        self._tensors: dict[str, torch.Tensor] = {}
        buffers = {} if buffers is None else buffers
        for name, tensor in tensors.items():
            tensor = tensor.detach()
            if tensor.is_cuda:
                host = buffers.get(name)
                if host is None or host.shape != tensor.shape or host.dtype != tensor.dtype:
                    host = buffers[name] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                self._tensors[name] = host.copy_(tensor, non_blocking=True)
            else:  # a snapshot: the step after may update the source in place before it is read
                self._tensors[name] = tensor.clone()
        if any(t.is_pinned() for t in self._tensors.values()):
            self._event = torch.cuda.Event()
            self._event.record()

    def get(self) -> dict[str, torch.Tensor]:
        """The tensors on the host (CPU tensors), once their copy has finished."""
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._tensors
