"""The kernels under DeepSeekMoE: grouping tokens by expert, grouped expert GEMMs, and fused combine ops.

Everything here is device work with static shapes and no host sync on the forward path (torch.compile
and CUDA graphs need that): `sort_by_expert` orders the (token, slot) pairs, `expert_matmul` runs
every expert's rows through torch's grouped_mm (or an exact padded-bmm fallback, a custom op),
`gather_rows` and `sum_rows` move rows in and out of expert order with hand-written backwards,
and `router_logits` is the float32 router GEMM. moe.py composes them as the paper describes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3.model.autograd_output import fresh_output
from dsv3.model.gemv import compute_dtype, linear, one_compiled_row

__all__ = [
    "sort_by_expert",
    "inverse_permutation",
    "grouped_mm_supported",
    "padded_expert_mm",
    "expert_matmul",
    "gathered_expert_ffn",
    "expert_counts",
    "gather_rows",
    "sum_rows",
    "pair_sum",
    "router_logits",
]


def sort_by_expert(indices: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Order of the N·k (token, slot) pairs grouped by expert (N·k,) and each expert's end offset (E,).

    The offsets come from a search in the sorted ids rather than a bincount, so every shape is static
    (no data-dependent sizes for torch.compile, no host sync). The sort runs on the narrowest integer
    type that holds the ids: a radix sort makes one pass per key byte, and int64 keys took 2-3× as
    long as uint8 on the H200.
    """
    flat = indices.flatten()
    order = flat.to(sort_key_dtype(n_experts)).argsort(stable=True)
    ends = torch.searchsorted(
        flat[order], torch.arange(n_experts, device=flat.device, dtype=flat.dtype), right=True
    )
    return order, ends


def sort_key_dtype(n_experts: int) -> torch.dtype:
    """The narrowest integer type holding expert ids 0..n_experts-1."""
    return torch.uint8 if n_experts <= 256 else torch.int16 if n_experts <= 2**15 else torch.int64


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """The permutation that undoes `order`: x[order][inverse] == x."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


# --------------------------------------------------------------------------------------------
# Grouped GEMM over tokens sorted by expert
# --------------------------------------------------------------------------------------------


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether torch's grouped_mm takes x (M, in) @ w (E, out, in)ᵀ: bf16 only (its kernels and its
    torch.compile support are bf16-only), 16-byte aligned widths, CPU or CUDA sm80+."""
    if not hasattr(F, "grouped_mm") or x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16:
        return False
    if any(dim * x.element_size() % 16 for dim in (w.shape[1], w.shape[2])):
        return False
    if x.device.type == "cuda":
        return torch.cuda.get_device_capability(x.device) >= (8, 0)
    return x.device.type == "cpu"


def _pad_by_expert(x: torch.Tensor, ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of x (M, n) sorted by expert → (E, capacity + 1, n) zero-padded, and each row's (expert, slot).

    Rows past the last expert's end (expert parallelism gathers more rows than this rank's experts
    take) belong to no expert: they go to the extra last slot, which is zeroed, so they add nothing to
    the weight gradients and their outputs are 0 (grouped_mm leaves them unwritten instead).
    """
    rows = torch.arange(x.shape[0], device=x.device)
    starts = torch.cat((ends.new_zeros(1), ends[:-1]))
    expert = torch.searchsorted(ends, rows, right=True)  # (M,) the expert of each sorted row, E past the end
    inside = expert < ends.shape[0]
    expert = expert.clamp_max(ends.shape[0] - 1)
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        capacity = x.shape[0]  # a CUDA graph allows no host sync: room for every row in one expert
    else:
        capacity = int((ends - starts).max())  # a host sync; this op is opaque to torch.compile
    slot = torch.where(inside, rows - starts[expert], capacity)
    batch = x.new_zeros(ends.shape[0], capacity + 1, x.shape[1]).index_put_((expert, slot), x)
    batch[:, capacity] = 0
    return batch, expert, slot


@torch.library.custom_op("dsv3::padded_expert_mm", mutates_args=())
def padded_expert_mm(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """The exact fallback of grouped_mm: x (M, in) sorted by expert, w (E, out, in) → (M, out), one bmm
    over the experts' rows padded to the largest load (no Python loop over experts)."""
    batch, expert, slot = _pad_by_expert(x, ends)
    return torch.bmm(batch, w.transpose(1, 2))[expert, slot]


@torch.library.custom_op("dsv3::padded_expert_mm_wgrad", mutates_args=())
def padded_expert_mm_wgrad(grad: torch.Tensor, x: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """d loss / d w (E, out, in) of `padded_expert_mm`: each expert's gradᵀ @ x over its rows."""
    g_batch, _, _ = _pad_by_expert(grad, ends)
    x_batch, _, _ = _pad_by_expert(x, ends)
    return torch.bmm(g_batch.transpose(1, 2), x_batch)


@padded_expert_mm.register_fake
def _(x, w, ends):
    return x.new_empty(x.shape[0], w.shape[1])


@padded_expert_mm_wgrad.register_fake
def _(grad, x, ends):
    return x.new_empty(ends.shape[0], grad.shape[1], x.shape[1])


def _padded_expert_mm_setup(ctx, inputs, output) -> None:
    x, w, ends = inputs
    ctx.save_for_backward(x, w, ends)


def _padded_expert_mm_backward(ctx, grad):
    x, w, ends = ctx.saved_tensors
    grad_x = padded_expert_mm(grad, w.transpose(1, 2).contiguous(), ends)
    return grad_x, padded_expert_mm_wgrad(grad, x, ends), None


padded_expert_mm.register_autograd(_padded_expert_mm_backward, setup_context=_padded_expert_mm_setup)


def expert_matmul(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Rows of x (M, in) sorted by expert, times their expert's w (E, out, in)ᵀ → (M, out)."""
    if torch.is_autocast_enabled(x.device.type):  # grouped_mm is not on autocast's lists
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w = x.to(dtype), w.to(dtype)
    if x.shape[0] == 0:  # no rows: an expert-parallel rank none of whose experts got a token
        # (compiled, grouped_mm's weight gradient then gets an empty operand whose strides it
        # refuses); the empty product still gives w a (zero) gradient, as every rank's must be
        return F.linear(x, w[0])
    if grouped_mm_supported(x, w):
        return F.grouped_mm(x, w.transpose(-2, -1), offs=ends.to(torch.int32))
    return padded_expert_mm(x, w, ends)


def gathered_expert_ffn(
    x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> torch.Tensor:
    """Σ_k weight · SwiGLU expert(x) for a handful of tokens: x (N, d), weights and expert ids (N, k).

    Each (token, slot) pair reads its expert's weights by index: no sort into expert order, no grouped
    GEMM, no gathers in and out of that order. A decode step's few tokens make the grouped path a
    dozen tiny kernels whose launches cost more than the GEMVs themselves; here, under torch.compile,
    each product-and-sum is one reduction kernel that reads the indexed weights in place (eagerly
    they are copied first). Products are summed in float32 from operands in the GEMMs' dtype, as a
    GEMM does, with each row's combine weight applied in the activation as the grouped path does
    (`dsv3.model.swiglu.weighted_swiglu`); the result equals the grouped path's up to the order of the sums.
    """
    N, k = indices.shape
    dtype = compute_dtype(x)
    ids = indices.reshape(-1)
    xs = x.to(dtype).float().repeat_interleave(k, dim=0).unsqueeze(1)  # (N·k, 1, d)
    h = (gate_up_proj[ids].to(dtype).float() * xs).sum(-1).to(dtype)  # (N·k, 2I)
    gate, up = h.float().chunk(2, dim=-1)
    # the combine weight inside the activation, rounded once, as the grouped path (`weighted_swiglu`)
    a = (F.silu(gate) * up * weights.reshape(-1, 1).float()).to(dtype).float().unsqueeze(1)  # (N·k, 1, I)
    y = (down_proj[ids].to(dtype).float() * a).sum(-1).to(dtype)  # (N·k, d) weighted rows
    return y.view(N, k, -1).sum(1, dtype=torch.float32).to(dtype)


def expert_counts(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens routed to each expert (E,), int64, for a few (token, slot) pairs: an (N·k, E) comparison
    summed, which torch.compile makes one fused kernel. bincount syncs with the host, and index_add_
    stays an eager sort-and-accumulate under Inductor (five kernels a layer in the H200 profile)."""
    experts = torch.arange(n_experts, device=indices.device, dtype=indices.dtype)
    return (indices.reshape(-1, 1) == experts).sum(0)


class _GatherRows(torch.autograd.Function):
    """out = x[index] in `dtype`, where index reads every row of x exactly `fold` times.

    Casting before gathering moves the k copies in the experts' dtype (bf16 under autocast) instead
    of gathering float32 rows and casting each copy. The backward gathers with the inverse permutation
    and sums the `fold` copies in x's dtype, instead of the scatter-add autograd would use:
    deterministic, no atomics, and the same float32 sum as gathering float32 rows.
    """

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, fold: int, dtype: torch.dtype | None
    ) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.fold, ctx.in_dtype = fold, x.dtype
        return x.to(dtype or x.dtype).index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        g = grad.index_select(0, inverse)  # back in (row, copy) order
        if ctx.fold > 1:
            return g.view(-1, ctx.fold, g.shape[-1]).sum(1, dtype=ctx.in_dtype), None, None, None, None
        return g.to(ctx.in_dtype), None, None, None, None


class _SumRows(torch.autograd.Function):
    """out (N, d) = Σ_j y[inverse[t·fold + j]] over each token t's `fold` rows of y (N·fold, d), summed
    in float32: the combine of rows in expert order back into tokens. The transpose of `_GatherRows`
    (its backward is this forward): the backward hands each row its token's gradient, grad[index]."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, inverse: torch.Tensor, index: torch.Tensor, fold: int) -> torch.Tensor:
        ctx.save_for_backward(index)
        rows = y.index_select(0, inverse).view(-1, fold, y.shape[-1])
        return fresh_output(rows.sum(1, dtype=torch.promote_types(y.dtype, torch.float32)).to(y.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None, None


class _PairSum(torch.autograd.Function):
    """out (M, d) = Σ over a row's pairs p of y[p], from y (P, d) with pairs in any order.

    `pair_slot` (P,) names each pair's place row · k + slot. The float32 sum runs over a row's slots
    in a fixed order (slot 0 first), as `sum_rows` sums one process's (expert parallelism: a received
    token has only its experts on this rank, 1 to k of its k slots; a slot without a pair adds
    nothing). The backward hands each pair its row's gradient.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, pair_slot: torch.Tensor, rows: int, k: int) -> torch.Tensor:
        ctx.save_for_backward(pair_slot)
        ctx.k = k
        P = y.shape[0]
        slot_pair = torch.full((rows * k,), P, dtype=torch.long, device=y.device)  # P: the zero row
        slot_pair[pair_slot] = torch.arange(P, device=y.device)
        slot_pair = slot_pair.view(rows, k)
        padded = torch.cat([y, y.new_zeros(1, y.shape[1])])
        out = torch.zeros(rows, y.shape[1], dtype=torch.float32, device=y.device)
        for j in range(k):
            out += padded.index_select(0, slot_pair[:, j]).float()
        return fresh_output(out.to(y.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (pair_slot,) = ctx.saved_tensors
        return grad.index_select(0, pair_slot // ctx.k), None, None, None


class _Bf16RouterLogits(torch.autograd.Function):
    """x (N, d) @ w (E, d)ᵀ → float32 logits from bf16 operands, as one bf16 GEMM with a float32 output
    (CUDA): the same products and float32 sums as upcasting both first, at bf16 GEMM speed. The
    gradients are bf16 GEMMs, as the operands' own dtype asks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return torch.mm(x, w.t(), out_dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        grad = grad.to(x.dtype)
        return grad @ w, grad.t() @ x


def router_logits(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Router logits (N, E) in float32, as DeepSeek-V3 and transformers compute them."""
    if one_compiled_row(x):
        return linear(x.float(), w.float())  # a decode step's one token: a fused reduction (dsv3.model.gemv)
    if x.is_cuda and x.dtype == w.dtype == torch.bfloat16:
        return _Bf16RouterLogits.apply(x, w)
    return F.linear(x.float(), w.float())


def gather_rows(
    x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, fold: int, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """x[index] in `dtype` (default x's; see `_GatherRows`): `index` reads every row of x `fold` times,
    `inverse` undoes it."""
    return _GatherRows.apply(x, index, inverse, fold, dtype)


def sum_rows(y: torch.Tensor, inverse: torch.Tensor, index: torch.Tensor, fold: int) -> torch.Tensor:
    """Σ of each token's `fold` rows of y (N·fold, d) in expert order → (N, d) in y's dtype, summed in
    float32; `inverse` reads them in (token, slot) order, `index` (each row's token) undoes it."""
    return _SumRows.apply(y, inverse, index, fold)


def pair_sum(y: torch.Tensor, pair_slot: torch.Tensor, rows: int, k: int) -> torch.Tensor:
    """Σ over each of `rows` rows' pairs of y (P, d) → (rows, d) in y's dtype, summed in float32;
    pair_slot (P,): each pair's row · k + slot (see `_PairSum`)."""
    return _PairSum.apply(y, pair_slot, rows, k)
