"""torch.compile with a way out: a compiler failure costs one warning, not the run or the server.

Inductor fails on some inputs (seen: the FP8 latent cache on CPU). Where a compiled function is an
optimisation of an eager one that computes the same, the caller keeps working on the eager one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

__all__ = ["compiled_or_eager"]

log = logging.getLogger(__name__)


def compiled_or_eager(
    fn: Callable[..., Any], what: str, context: Callable[[], AbstractContextManager] = nullcontext,
    **compile_kwargs: Any,
) -> Callable[..., Any]:
    """`fn` through torch.compile (called inside `context()`); if compiling fails, one warning naming
    `what`, and `fn` itself from then on (so an error of `fn`'s own is raised again by that call)."""
    compiled = torch.compile(fn, **compile_kwargs)
    failed = False

    def call(*args: Any) -> Any:
        nonlocal failed
        if not failed:
            try:
                with context():
                    return compiled(*args)
            except Exception as err:  # noqa: BLE001 - any compiler failure; fn's own errors recur below
                failed = True
                log.warning("%s: running uncompiled (torch.compile failed: %s)", what,
                            str(err).strip().splitlines()[0])
        return fn(*args)

    return call
