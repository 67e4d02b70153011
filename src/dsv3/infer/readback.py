"""Reading a step's results back to the host without waiting for the steps queued behind it.

`tensor.tolist()` on a GPU is a blocking copy on the stream: it returns only when everything
enqueued so far has run. With async scheduling the engine has already enqueued the next step when
it reads this one back, so a plain `.tolist()` would also wait for that next step and leave the
device idle while the host then works on the results, losing the overlap the scheduling is for.
`ReadBack` instead enqueues the copies into pinned host memory right behind the work that produces
the tensors and records an event there; reading waits for that event only.
"""

from __future__ import annotations

import torch

__all__ = ["ReadBack"]


class ReadBack:
    """Host copies of some device tensors, taken at the point of the stream where it is built."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        self._event: torch.cuda.Event | None = None
        if tensors and tensors[0].is_cuda:
            pinned = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            self._host = [h.copy_(t, non_blocking=True) for h, t in zip(pinned, tensors, strict=True)]
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = [t.detach().clone() for t in tensors]  # the values now, as on a GPU

    def lists(self) -> list[list]:
        """The tensors as (nested) lists, once the work that produced them has run."""
        if self._event is not None:
            self._event.synchronize()
        return [t.tolist() for t in self._host]
