"""Row ops that stop at a bound the GPU knows and the host does not: the all-gather dispatcher's pairs.

Expert parallelism's all-gather dispatcher (expert_allgather.py) lays out the whole group's (token,
slot) pairs, this rank's first; only the first `bound` rows (a device scalar: how many pairs routed
here) are real, the rest are never computed. Its grouped GEMMs already stop at the bound (their group
offsets end there), but torch ops between them have static shapes, so the gather into expert order,
SwiGLU's product, the masking and the weighted sum back into token order all ran over every row of
the group: ep times the local path's rows (twice at ep = 2). Each op here reads the bound on the GPU
and touches only the rows below it, which leaves the rows past it unspecified (nothing reads them):

- `bounded_gather`: out[p] = src[index[p]] (· scale[p]) for p < bound;
- `bounded_reduce`: out[t] = Σ_s w[t, s] · src[pos[t, s]] over the slots with pos < bound, in float32;
- `bounded_dot`: out[t, s] = src[pos[t, s]] · other[t] where pos < bound, else 0;
- `bounded_swiglu` and its backward: silu(gate) · up on the rows below the bound.

On CUDA they are Triton kernels (one program a row, masked loads past the bound: no memory traffic);
elsewhere torch ops over every row with the same results below the bound (CPU ranks in the tests).
They are torch custom ops, opaque to torch.compile, with no host sync.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dsv3.model.moe import swiglu

__all__ = ["bounded_gather", "bounded_reduce", "bounded_dot", "bounded_swiglu", "bounded_swiglu_backward"]

_BLOCK = 1024  # columns a program handles at a time


# --- reference implementations (every device; CUDA takes the kernels below) ------------------------


def _live_rows(src: torch.Tensor, pos: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """src[pos] (T, k, d) in float32, 0 where pos ≥ bound (those rows are unspecified, maybe NaN)."""
    rows = src.index_select(0, pos.clamp(max=src.shape[0] - 1).flatten()).view(*pos.shape, src.shape[1])
    return torch.where((pos < bound).unsqueeze(-1), rows.float(), 0.0)


@torch.library.custom_op("dsv3::bounded_gather", mutates_args=())
def bounded_gather(
    src: torch.Tensor, index: torch.Tensor, bound: torch.Tensor, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """(P, d) in src's dtype: src[index[p]] · scale[p] for p < bound (the product in float32)."""
    out = src.index_select(0, index)
    return out if scale is None else (out.float() * scale.float().unsqueeze(1)).to(src.dtype)


@torch.library.custom_op("dsv3::bounded_reduce", mutates_args=())
def bounded_reduce(
    src: torch.Tensor, pos: torch.Tensor, bound: torch.Tensor, weight: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(T, d): Σ over the slots s of pos (T, k) with pos < bound of weight[t, s] · src[pos[t, s]],
    summed in float32, in `out_dtype` (default src's)."""
    rows = _live_rows(src, pos, bound)
    if weight is not None:
        rows = rows * weight.float().unsqueeze(-1)
    return rows.sum(1).to(out_dtype or src.dtype)


@torch.library.custom_op("dsv3::bounded_dot", mutates_args=())
def bounded_dot(
    src: torch.Tensor, other: torch.Tensor, pos: torch.Tensor, bound: torch.Tensor
) -> torch.Tensor:
    """(T, k) float32: src[pos[t, s]] · other[t] where pos < bound, else 0."""
    return (_live_rows(src, pos, bound) * other.float().unsqueeze(1)).sum(-1)


@torch.library.custom_op("dsv3::bounded_swiglu", mutates_args=())
def bounded_swiglu(gate_up: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """(P, 2I) → (P, I): silu(gate) · up for the rows below the bound."""
    return swiglu(gate_up)


@torch.library.custom_op("dsv3::bounded_swiglu_backward", mutates_args=())
def bounded_swiglu_backward(gate_up: torch.Tensor, grad: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """d loss / d gate_up (P, 2I) of `bounded_swiglu`, given its output's gradient (P, I)."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    g = grad.float()
    sig = torch.sigmoid(gate)
    d_gate = g * up * sig * (1 + gate * (1 - sig))
    d_up = g * gate * sig
    return torch.cat([d_gate, d_up], dim=-1).to(gate_up.dtype)


@bounded_gather.register_fake
def _(src, index, bound, scale=None):
    return src.new_empty(index.shape[0], src.shape[1])


@bounded_reduce.register_fake
def _(src, pos, bound, weight=None, out_dtype=None):
    return src.new_empty(pos.shape[0], src.shape[1], dtype=out_dtype or src.dtype)


@bounded_dot.register_fake
def _(src, other, pos, bound):
    return src.new_empty(pos.shape, dtype=torch.float32)


@bounded_swiglu.register_fake
def _(gate_up, bound):
    return gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)


@bounded_swiglu_backward.register_fake
def _(gate_up, grad, bound):
    return torch.empty_like(gate_up)


# --- CUDA: Triton kernels ---------------------------------------------------------------------------


def triton_ops() -> dict[str, Callable[..., torch.Tensor]]:
    """The Triton implementations, by op name (same signatures as the ops). Each launches one program
    a row. They run on CUDA tensors, and on CPU ones under Triton's interpreter (TRITON_INTERPRET=1:
    the tests)."""
    import triton
    import triton.language as tl

    @triton.jit
    def gather_kernel(src, index, scale, bound, out, d: tl.constexpr, HAS_SCALE: tl.constexpr,
                      BLOCK: tl.constexpr):
        p = tl.program_id(0).to(tl.int64)
        live = p < tl.load(bound)
        row = tl.load(index + p).to(tl.int64)
        for start in range(0, d, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = (cols < d) & live
            v = tl.load(src + row * d + cols, mask=mask, other=0.0)
            if HAS_SCALE:
                v = v.to(tl.float32) * tl.load(scale + p).to(tl.float32)
            tl.store(out + p * d + cols, v.to(out.dtype.element_ty), mask=mask)

    @triton.jit
    def reduce_kernel(src, pos, weight, bound, out, d: tl.constexpr, k: tl.constexpr,
                      HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        n = tl.load(bound)
        for start in range(0, d, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < d
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for s in range(k):
                row = tl.load(pos + t * k + s).to(tl.int64)
                live = row < n
                v = tl.load(src + row * d + cols, mask=inside & live, other=0.0).to(tl.float32)
                if HAS_WEIGHT:
                    v = v * tl.load(weight + t * k + s).to(tl.float32)
                acc += v
            tl.store(out + t * d + cols, acc.to(out.dtype.element_ty), mask=inside)

    @triton.jit
    def dot_kernel(src, other, pos, bound, out, d: tl.constexpr, k: tl.constexpr, BLOCK: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        n = tl.load(bound)
        for s in range(k):
            row = tl.load(pos + t * k + s).to(tl.int64)
            live = row < n
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, d, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = (cols < d) & live
                a = tl.load(src + row * d + cols, mask=mask, other=0.0).to(tl.float32)
                b = tl.load(other + t * d + cols, mask=mask, other=0.0).to(tl.float32)
                acc += a * b
            tl.store(out + t * k + s, tl.sum(acc, axis=0))

    @triton.jit
    def swiglu_kernel(gate_up, grad, bound, out, inter: tl.constexpr, BACKWARD: tl.constexpr,
                      BLOCK: tl.constexpr):
        """Forward: out (P, I) = silu(gate) · up. Backward: out (P, 2I) = the gradient with respect to
        [gate; up], given the output's (grad (P, I))."""
        p = tl.program_id(0).to(tl.int64)
        live = p < tl.load(bound)
        for start in range(0, inter, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = (cols < inter) & live
            g = tl.load(gate_up + p * 2 * inter + cols, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(gate_up + p * 2 * inter + inter + cols, mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(g)
            if BACKWARD:
                dh = tl.load(grad + p * inter + cols, mask=mask, other=0.0).to(tl.float32)
                d_gate, d_up = dh * u * sig * (1 + g * (1 - sig)), dh * g * sig
                tl.store(out + p * 2 * inter + cols, d_gate.to(out.dtype.element_ty), mask=mask)
                tl.store(out + p * 2 * inter + inter + cols, d_up.to(out.dtype.element_ty), mask=mask)
            else:
                tl.store(out + p * inter + cols, (g * sig * u).to(out.dtype.element_ty), mask=mask)

    def block(width: int) -> int:
        return min(_BLOCK, triton.next_power_of_2(width))

    def gather(src, index, bound, scale=None):
        src, out = src.contiguous(), src.new_empty(index.shape[0], src.shape[1])
        if out.numel():
            dummy = scale if scale is not None else index  # a pointer the kernel never reads
            gather_kernel[(index.shape[0],)](src, index, dummy, bound, out, src.shape[1],
                                             HAS_SCALE=scale is not None, BLOCK=block(src.shape[1]))
        return out

    def reduce(src, pos, bound, weight=None, out_dtype=None):
        src, pos = src.contiguous(), pos.contiguous()
        out = src.new_empty(pos.shape[0], src.shape[1], dtype=out_dtype or src.dtype)
        if out.numel():
            w = weight.contiguous() if weight is not None else pos
            reduce_kernel[(pos.shape[0],)](src, pos, w, bound, out, src.shape[1], pos.shape[1],
                                           HAS_WEIGHT=weight is not None, BLOCK=block(src.shape[1]))
        return out

    def dot(src, other, pos, bound):
        src, other, pos = src.contiguous(), other.contiguous(), pos.contiguous()
        out = src.new_empty(pos.shape, dtype=torch.float32)
        if out.numel():
            dot_kernel[(pos.shape[0],)](src, other, pos, bound, out, src.shape[1], pos.shape[1],
                                        BLOCK=block(src.shape[1]))
        return out

    def swiglu_forward(gate_up, bound):
        gate_up = gate_up.contiguous()
        inter = gate_up.shape[1] // 2
        out = gate_up.new_empty(gate_up.shape[0], inter)
        if out.numel():
            swiglu_kernel[(gate_up.shape[0],)](gate_up, gate_up, bound, out, inter, BACKWARD=False,
                                               BLOCK=block(inter))
        return out

    def swiglu_backward(gate_up, grad, bound):
        gate_up, grad = gate_up.contiguous(), grad.contiguous()
        out = torch.empty_like(gate_up)
        if out.numel():
            swiglu_kernel[(gate_up.shape[0],)](gate_up, grad, bound, out, grad.shape[1], BACKWARD=True,
                                               BLOCK=block(grad.shape[1]))
        return out

    return {"bounded_gather": gather, "bounded_reduce": reduce, "bounded_dot": dot,
            "bounded_swiglu": swiglu_forward, "bounded_swiglu_backward": swiglu_backward}


def _register_cuda_kernels() -> None:
    """The Triton kernels become the ops' CUDA implementations, where Triton and CUDA are present."""
    if not torch.cuda.is_available():
        return
    try:
        ops = triton_ops()
    except ImportError:  # a CUDA build without Triton: the reference implementations run
        return
    for name, fn in ops.items():
        globals()[name].register_kernel("cuda")(fn)


_register_cuda_kernels()
