"""A step's numbers copied from the GPU to the host without making the GPU wait.

Reading a CUDA tensor on the host (`.item()`, `.tolist()`, `bool(t)`) blocks the Python thread until
the GPU has run everything queued so far, and the GPU then idles while the host prepares the next step.
The trainer instead queues a copy of the step's numbers into pinned host memory behind the step's own
work and reads it a step later, when the copy has long finished.
"""

from __future__ import annotations

import torch

__all__ = ["HostCopy"]


class HostCopy:
    """Device tensors on their way to host memory; `get()` waits for the copy (only) when it is read."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self._event: torch.cuda.Event | None = None
        self._tensors: dict[str, torch.Tensor] = {}
        for name, tensor in tensors.items():
            tensor = tensor.detach()
            if tensor.is_cuda:
                host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
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
