"""Row ops that stop at a bound the GPU knows and the host does not: the all-gather dispatcher's pairs.

Expert parallelism's all-gather dispatcher (expert_allgather.py) lays out the whole group's (token,
slot) pairs, this rank's first; only the first `bound` rows (a device scalar: how many pairs routed
here) are real, the rest are never computed. Its grouped GEMMs already stop at the bound (their group
offsets end there), but torch ops between them have static shapes, so the gather into expert order,
SwiGLU's product, the masking and the weighted sum back into token order all ran over every row of
the group: ep times the local path's rows (twice at ep = 2). Each op here reads the bound on the GPU
and touches only the rows below it, which leaves the rows past it unspecified (nothing reads them):

- `bounded_gather`: out[p] = src[index[p]] for p < bound;
- `bounded_reduce`: out[t] = Σ_s src[pos[t, s]] over the slots with pos < bound, in float32;
- `bounded_swiglu` and its backward: w · silu(gate) · up on the rows below the bound (the combine
  weights applied inside the activation, as one process does: dsv3.model.swiglu), the weights'
  gradient 0 past it.

On CUDA they are Triton kernels (one program a row, masked loads past the bound: no memory traffic;
SwiGLU's is dsv3.model.swiglu's, which the one-process experts' backward runs too);
elsewhere torch ops over every row with the same results below the bound (CPU ranks in the tests).
They are torch custom ops, opaque to torch.compile, with no host sync.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dsv3.model.cuda_kernels import register_triton_kernels
from dsv3.model.swiglu import triton_swiglu, weighted_swiglu_backward, weighted_swiglu_forward

__all__ = ["bounded_gather", "bounded_reduce", "bounded_swiglu", "bounded_swiglu_backward"]

_BLOCK = 1024  # columns a program handles at a time


# --- reference implementations (every device; CUDA takes the kernels below) ------------------------


def _live_rows(src: torch.Tensor, pos: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """src[pos] (T, k, d) in float32, 0 where pos ≥ bound (those rows are unspecified, maybe NaN)."""
    rows = src.index_select(0, pos.clamp(max=src.shape[0] - 1).flatten()).view(*pos.shape, src.shape[1])
    return torch.where((pos < bound).unsqueeze(-1), rows.float(), 0.0)


@torch.library.custom_op("dsv3::bounded_gather", mutates_args=())
def bounded_gather(src: torch.Tensor, index: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """(P, d): src[index[p]] for p < bound."""
    return src.index_select(0, index)


@torch.library.custom_op("dsv3::bounded_reduce", mutates_args=())
def bounded_reduce(
    src: torch.Tensor, pos: torch.Tensor, bound: torch.Tensor, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """(T, d): Σ over the slots s of pos (T, k) with pos < bound of src[pos[t, s]], summed in float32,
    in `out_dtype` (default src's)."""
    return _live_rows(src, pos, bound).sum(1).to(out_dtype or src.dtype)


@torch.library.custom_op("dsv3::bounded_swiglu", mutates_args=())
def bounded_swiglu(gate_up: torch.Tensor, w: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """(P, 2I), (P, 1) → (P, I): w · silu(gate) · up for the rows below the bound, in float32, rounded
    once to gate_up's dtype."""
    return weighted_swiglu_forward(gate_up, w)


@torch.library.custom_op("dsv3::bounded_swiglu_backward", mutates_args=())
def bounded_swiglu_backward(
    gate_up: torch.Tensor, w: torch.Tensor, grad: torch.Tensor, bound: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of `bounded_swiglu` given its output's (P, I): d gate_up (P, 2I), unspecified past
    the bound, and dw (P, 1), 0 past it (those pairs' weights belong to other ranks)."""
    d_gate_up, dw = weighted_swiglu_backward(gate_up, w, grad)
    live = torch.arange(gate_up.shape[0], device=gate_up.device).unsqueeze(1) < bound
    return d_gate_up, torch.where(live, dw, 0.0)


@bounded_gather.register_fake
def _(src, index, bound):
    return src.new_empty(index.shape[0], src.shape[1])


@bounded_reduce.register_fake
def _(src, pos, bound, out_dtype=None):
    return src.new_empty(pos.shape[0], src.shape[1], dtype=out_dtype or src.dtype)


@bounded_swiglu.register_fake
def _(gate_up, w, bound):
    return gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)


@bounded_swiglu_backward.register_fake
def _(gate_up, w, grad, bound):
    return torch.empty_like(gate_up), torch.empty_like(w)


# --- CUDA: Triton kernels ---------------------------------------------------------------------------


def triton_ops() -> dict[str, Callable[..., torch.Tensor]]:
    """The Triton implementations, by op name (same signatures as the ops). Each launches one program
    a row. They run on CUDA tensors, and on CPU ones under Triton's interpreter (TRITON_INTERPRET=1:
    the tests)."""
    import triton
    import triton.language as tl

    @triton.jit
    def gather_kernel(src, index, bound, out, d: tl.constexpr, BLOCK: tl.constexpr):
        p = tl.program_id(0).to(tl.int64)
        live = p < tl.load(bound)
        row = tl.load(index + p).to(tl.int64)
        for start in range(0, d, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = (cols < d) & live
            tl.store(out + p * d + cols, tl.load(src + row * d + cols, mask=mask, other=0.0), mask=mask)

    @triton.jit
    def reduce_kernel(src, pos, bound, out, d: tl.constexpr, k: tl.constexpr, BLOCK: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        n = tl.load(bound)
        for start in range(0, d, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < d
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for s in range(k):
                row = tl.load(pos + t * k + s).to(tl.int64)
                live = row < n
                acc += tl.load(src + row * d + cols, mask=inside & live, other=0.0).to(tl.float32)
            tl.store(out + t * d + cols, acc.to(out.dtype.element_ty), mask=inside)

    def block(width: int) -> int:
        return min(_BLOCK, triton.next_power_of_2(width))

    def gather(src, index, bound):
        src, out = src.contiguous(), src.new_empty(index.shape[0], src.shape[1])
        if out.numel():
            gather_kernel[(index.shape[0],)](src, index, bound, out, src.shape[1], BLOCK=block(src.shape[1]))
        return out

    def reduce(src, pos, bound, out_dtype=None):
        src, pos = src.contiguous(), pos.contiguous()
        out = src.new_empty(pos.shape[0], src.shape[1], dtype=out_dtype or src.dtype)
        if out.numel():
            reduce_kernel[(pos.shape[0],)](src, pos, bound, out, src.shape[1], pos.shape[1],
                                           BLOCK=block(src.shape[1]))
        return out

    launch_swiglu = triton_swiglu()

    def swiglu_forward(gate_up, w, bound):
        gate_up, w = gate_up.contiguous(), w.contiguous()
        out = gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)
        launch_swiglu(gate_up, None, w, bound, out, None, backward=False)
        return out

    def swiglu_backward(gate_up, w, grad, bound):
        gate_up, w, grad = gate_up.contiguous(), w.contiguous(), grad.contiguous()
        out, dw = torch.empty_like(gate_up), torch.empty_like(w)
        launch_swiglu(gate_up, grad, w, bound, out, dw, backward=True)  # dw: 0 past the bound
        return out, dw

    return {"bounded_gather": gather, "bounded_reduce": reduce, "bounded_swiglu": swiglu_forward,
            "bounded_swiglu_backward": swiglu_backward}


register_triton_kernels(lambda: {globals()[name]: fn for name, fn in triton_ops().items()})
