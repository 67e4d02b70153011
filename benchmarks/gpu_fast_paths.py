"""The training fast paths against the plain one, in bf16 autocast on the device `dsv3 train` uses.

The CPU tests prove in fp32 that compiled blocks, activation checkpointing and the trainer's on-device
skip compute what the plain path computes; this checks the same on a GPU, where the kernels differ
(Inductor's fused Triton code, cuDNN/flash attention, grouped_mm, fused AdamW's CUDA kernel):

- one forward + backward of the same weights and batch: eager (the reference), `compile_blocks()`,
  activation checkpointing (whole and selective), both together, the chunked loss
  (`loss_chunk_tokens`) eager and compiled: loss difference and each gradient's largest difference
  relative to the reference's largest entry, worst and median over parameters. In bf16 these are not
  0: rounding differs between eager and Inductor code, and where two experts' scores nearly tie a
  token's top-k choice can flip, which moves that router's gradient a lot (seen on CPU: the median
  stays small while a gate weight's worst entry moves by tens of per cent); in fp32 all agree to ~1e-6;
- grouped_mm fed rows past its last group (expert parallelism's all-gather dispatch), NaN in the
  input's and the output gradient's extra rows: the covered rows' results and the weight gradient are
  those of the trimmed rows, bit for bit;
- the all-gather dispatch's bounded row ops (Triton kernels) against their CPU references in bf16;
- the one-process experts' weighted SwiGLU backward (a Triton kernel) against its CPU reference in bf16;
- fused AdamW with the trainer's `found_inf` flag: a flagged step leaves parameters and step count
  exactly as they were; an unflagged one equals a step without the flag, bit for bit;
- AdamW with bf16 moments (`train.optimizer_state_dtype`), its update compiled on the GPU: against the
  same update run eagerly over 5 steps (largest parameter difference, relative), and its skip flag.

    python benchmarks/gpu_fast_paths.py --preset small --batch 2 --seq 1024     # one GPU
    python benchmarks/gpu_fast_paths.py --device cpu --preset tiny --batch 1 --seq 32

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json

import torch

from dsv3.config import load_model_config
from dsv3.model import Transformer


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                   help="bf16: autocast as `dsv3 train` runs on a GPU; fp32: none (must agree to ~1e-6)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk", type=int, default=512, help="positions per chunk of the chunked loss")
    p.add_argument("--only", default="", help="comma-separated kernel checks to run alone, skipping the "
                   "model's: expert_rows_past_the_end, bounded_rows, weighted_swiglu, fp8_gemms, "
                   "fused_adamw_found_inf, adamw_bf16_moments, master_weights")
    return p.parse_args()


def _loss_and_grads(model: Transformer, ids: torch.Tensor, autocast) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    with autocast:
        out = model.forward_with_losses(ids[:, :-1], ids[:, 1:], mtp_lambda=0.3, balance_alpha=1e-4,
                                        return_logits=False)
    out.loss.backward()
    return out.loss.item(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
                             if p.grad is not None}


def _compare(ref: tuple[float, dict], got: tuple[float, dict]) -> dict:
    (loss_a, grads_a), (loss_b, grads_b) = ref, got
    errors = {n: ((grads_b[n] - g).abs().max() / g.abs().max().clamp_min(1e-30)).item()
              for n, g in grads_a.items()}
    worst = max(errors, key=errors.get)
    return {"loss_abs_diff": abs(loss_a - loss_b), "grad_rel_err_max": errors[worst], "grad_worst": worst,
            "grad_rel_err_median": float(torch.tensor(list(errors.values())).median()),
            "grads_missing": sorted(set(grads_a) - set(grads_b))}


def _fused_adamw_flag(device: torch.device) -> dict:
    """A flagged fused step changes nothing; an unflagged one equals a plain fused step."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(1024, 257, device=device)) for _ in range(3)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, twin_opt = (torch.optim.AdamW(ps, lr=1e-3, fused=True) for ps in (params, twins))
    for ps in (params, twins):
        for p in ps:
            p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in params]
    opt.found_inf = torch.ones((), device=device)
    opt.step()
    unchanged = all(torch.equal(a, b) for a, b in zip(before, params, strict=True))
    steps_unchanged = all(opt.state[p]["step"].item() == 0 for p in params)
    opt.found_inf = torch.zeros((), device=device)
    opt.step()
    twin_opt.step()
    same = all(torch.equal(a, b) for a, b in zip(params, twins, strict=True))
    return {"flagged_step_changes_nothing": unchanged and steps_unchanged, "unflagged_equals_plain": same}


def _mixed_adamw(device: torch.device, masters: bool) -> dict:
    """MixedAdamW with bf16 moments (compiled update on a GPU) against its update run eagerly, and with
    `masters` on bf16 weights with float32 masters (train.param_dtype), whose weights must be their
    masters' rounding; a flagged step changes nothing."""
    from dsv3.train import adamw_mixed

    torch.manual_seed(0)
    dtype = torch.bfloat16 if masters else torch.float32
    start = [torch.randn(1024, 257, device=device) for _ in range(3)]
    params = [torch.nn.Parameter(p.to(dtype)) for p in start]
    twins = [torch.nn.Parameter(p.to(dtype)) for p in start]
    kept = {p: s.clone() for p, s in zip(params, start, strict=True)} if masters else None
    kept_twins = {p: s.clone() for p, s in zip(twins, start, strict=True)} if masters else None
    opt = adamw_mixed.MixedAdamW(params, lr=1e-3, masters=kept)
    eager = adamw_mixed.MixedAdamW(twins, lr=1e-3, masters=kept_twins)
    eager._update = adamw_mixed.adamw_update  # not compiled
    for step in range(5):
        for p, t in zip(params, twins, strict=True):
            gen = torch.Generator(device).manual_seed(step)
            p.grad = torch.randn(p.shape, device=device, generator=gen).to(dtype)
            t.grad = p.grad.clone()
        opt.step()
        eager.step()
    fp32 = list(kept.values()) if masters else params
    fp32_twins = list(kept_twins.values()) if masters else twins
    diff = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(fp32, fp32_twins, strict=True))
    before = [p.detach().clone() for p in [*params, *fp32]]
    opt.found_inf = torch.ones((), device=device)
    opt.step()
    unchanged = all(torch.equal(a, b) for a, b in zip(before, [*params, *fp32], strict=True))
    out = {"compiled_vs_eager_max_rel": diff, "flagged_step_changes_nothing": unchanged,
           "moments_dtype": str(opt.state[params[0]]["exp_avg"].dtype)}
    if masters:
        out["weights_are_their_masters_rounded"] = all(
            torch.equal(p, m.to(torch.bfloat16)) for p, m in zip(params, fp32, strict=True))
    return out


def _bf16_moments(device: torch.device) -> dict:
    return _mixed_adamw(device, masters=False)


def _master_weights(device: torch.device) -> dict:
    return _mixed_adamw(device, masters=True)


def _expert_rows_past_the_end(device: torch.device) -> dict:
    """grouped_mm fed more rows than its groups cover (the all-gather expert dispatch does): the covered
    rows' outputs and the weight gradient equal those of the trimmed rows, whatever the extra rows of
    its input and of its output's gradient hold (NaN here: the dispatch leaves them unwritten)."""
    from dsv3.model.moe_ops import expert_matmul

    torch.manual_seed(0)
    experts, rows, covered = 32, 8192, 4000
    ends = torch.linspace(0, covered, experts + 1, device=device)[1:].long()
    x = torch.randn(rows, 1024, device=device, dtype=torch.bfloat16)
    x[covered:] = float("nan")
    w = torch.randn(experts, 1024, 1024, device=device, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(rows, 1024, device=device, dtype=torch.bfloat16)
    g[covered:] = float("nan")
    x.requires_grad_()
    y = expert_matmul(x, w, ends)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    x_in = x.detach()[:covered].clone().requires_grad_()
    ry = expert_matmul(x_in, w, ends)
    rgx, rgw = torch.autograd.grad(ry, (x_in, w), g[:covered])
    return {"outputs_equal": torch.equal(y[:covered], ry), "weight_grad_equal": torch.equal(gw, rgw),
            "input_grad_equal": torch.equal(gx[:covered], rgx)}


def _bounded_rows(device: torch.device) -> dict:
    """The all-gather dispatch's bounded row ops (Triton kernels on CUDA) against their reference
    implementations on the CPU, in bf16 at `small`'s widths, rows past the bound holding NaN: the
    largest difference below the bound relative to the reference's largest entry (bf16 output rounding
    at most: ~4e-3), and whether any NaN got through."""
    from dsv3.parallel import bounded_rows as br

    g = torch.Generator().manual_seed(0)
    P, T, k, d, inter, bound = 60_000, 16_384, 6, 1024, 512, 41_000
    bf = torch.bfloat16
    ys = torch.randn(P, d, generator=g).to(bf)
    ys[bound:] = float("nan")
    gate_up = torch.randn(P, 2 * inter, generator=g).to(bf)
    gate_up[bound:] = float("nan")
    src = torch.randn(T, d, generator=g).to(bf)
    index, pos = torch.randint(0, T, (P,), generator=g), torch.randint(0, P, (T, k), generator=g)
    grad_h, w = torch.randn(P, inter, generator=g).to(bf), torch.rand(P, 1, generator=g)
    b = torch.tensor(bound)
    calls = {
        "gather": ("bounded_gather", (src, index, b), bound),
        "reduce": ("bounded_reduce", (ys, pos, b, torch.float32), None),
        "reduce_bf16": ("bounded_reduce", (ys, pos, b), None),
        "swiglu": ("bounded_swiglu", (gate_up, w, b), bound),
        "swiglu_backward": ("bounded_swiglu_backward", (gate_up, w, grad_h, b), bound),
    }
    out = {}
    for key, (name, args, rows) in calls.items():
        op = getattr(br, name)
        wants = op(*args)
        gots = op(*[a.to(device) if isinstance(a, torch.Tensor) else a for a in args])
        if isinstance(wants, torch.Tensor):
            wants, gots = (wants,), (gots,)
        for i, (want, got) in enumerate(zip(wants, gots, strict=True)):
            want, got = want.float(), got.float().cpu()
            if rows is not None:
                want, got = want[:rows], got[:rows]
            rel = float((got - want).abs().max() / want.abs().max())
            out[key if i == 0 else f"{key}_dw"] = {"rel_diff": rel, "nan": bool(got.isnan().any())}
    return out


def _weighted_swiglu(device: torch.device) -> dict:
    """The one-process experts' SwiGLU backward (`dsv3.model.swiglu`, a Triton kernel on CUDA) against
    its torch implementation on the CPU, in bf16 at a training layer's rows: d [gate; up] and dw,
    largest difference relative to the reference's largest entry (bf16 output rounding: ~4e-3)."""
    from dsv3.model.swiglu import weighted_swiglu_backward

    g = torch.Generator().manual_seed(0)
    out = {}
    for rows, inter in ((98_304, 512), (1_000, 1_030)):
        gate_up = torch.randn(rows, 2 * inter, generator=g).bfloat16()
        w, grad = torch.rand(rows, 1, generator=g), torch.randn(rows, inter, generator=g).bfloat16()
        want = weighted_swiglu_backward(gate_up, w, grad)
        got = weighted_swiglu_backward(gate_up.to(device), w.to(device), grad.to(device))
        out[f"{rows}x{inter}"] = {
            name: float((a.float().cpu() - b.float()).abs().max() / b.float().abs().max())
            for name, a, b in zip(("d_gate_up", "dw"), got, want, strict=True)
        }
    return out


def _fp8_gemms(device: torch.device) -> dict:
    """FP8 GEMMs on the GPU (cuBLAS's blockwise-scaled linears, the rowwise-scaled grouped experts:
    forward, dgrad, wgrad) against the float32 emulation on the CPU of the same quantized values and
    scales (should agree to float32 summation order), eager and compiled; and how far FP8 moves the
    products from bf16's."""
    from dsv3.model.fp8_experts import fp8_expert_matmul
    from dsv3.model.fp8_linear import fp8_linear
    from dsv3.model.moe_ops import expert_matmul

    torch.manual_seed(0)
    ends = torch.tensor([0, 700, 1500, 1500, 2600, 4096], device=device)  # an empty expert, uneven loads
    cases = {  # name: (fp8 function, bf16 function, x, w, dy, extra argument)
        "linear": (fp8_linear, lambda a, b: a @ b.to(a.dtype).t(),
                   torch.randn(4096, 1024, device=device, dtype=torch.bfloat16),
                   torch.randn(576, 1024, device=device) * 0.03,  # kv_a's 576 outputs: padded in dgrad
                   torch.randn(4096, 576, device=device, dtype=torch.bfloat16), ()),
        "experts": (fp8_expert_matmul, expert_matmul,
                    torch.randn(4096, 1024, device=device, dtype=torch.bfloat16),
                    torch.randn(6, 1024, 1024, device=device, dtype=torch.bfloat16) * 0.03,
                    torch.randn(4096, 1024, device=device, dtype=torch.bfloat16), (ends,)),
    }

    def run(fn, dev: str, x, w, dy, extra) -> list[torch.Tensor]:
        xi, wi = (t.detach().to(dev, copy=True).requires_grad_() for t in (x, w))  # fresh leaves each run
        y = fn(xi, wi, *(e.to(dev) for e in extra))
        y.backward(dy.to(dev))
        return [t.float().cpu() for t in (y, xi.grad, wi.grad)]

    def rel(got: list[torch.Tensor], ref: list[torch.Tensor]) -> dict:
        pairs = zip(("y", "dx", "dw"), got, ref, strict=True)
        return {k: ((g - e).norm() / e.norm()).item() for k, g, e in pairs}

    out: dict = {}
    for case, (fp8, bf16, *inputs) in cases.items():
        emulated = run(fp8, "cpu", *inputs)
        out[case] = {"eager": rel(run(fp8, device.type, *inputs), emulated)}
        if device.type == "cuda":  # Inductor's CPU code generator fails on the linear's backward
            out[case]["compiled"] = rel(run(torch.compile(fp8), device.type, *inputs), emulated)
        out[case]["vs_bf16"] = rel(emulated, run(bf16, device.type, *inputs))
    return out


KERNEL_CHECKS = {
    "fused_adamw_found_inf": _fused_adamw_flag, "adamw_bf16_moments": _bf16_moments,
    "master_weights": _master_weights,
    "expert_rows_past_the_end": _expert_rows_past_the_end, "bounded_rows": _bounded_rows,
    "weighted_swiglu": _weighted_swiglu,
    "fp8_gemms": _fp8_gemms,
}


def main() -> None:
    args = _parse()
    device = torch.device(args.device)
    if args.only:
        print(json.dumps({name: KERNEL_CHECKS[name](device) for name in args.only.split(",")}), flush=True)
        return
    cfg = load_model_config(args.preset)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen).to(device)
    model = Transformer(cfg, seed=args.seed).to(device)
    model.train()
    result: dict = {"preset": args.preset, "device": str(device), "dtype": args.dtype, "batch": args.batch,
                    "seq": args.seq}
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.dtype == "bf16")
    reference = _loss_and_grads(model, ids, autocast)

    def check(name: str, checkpointing: bool | str = False, chunk: int = 0) -> None:
        # each variant compiles afresh: together they would pass dynamo's recompile limit (8) per
        # block forward, where a real run only ever compiles one of them
        torch._dynamo.reset()
        model.activation_checkpointing, model.loss_chunk_tokens = checkpointing, chunk
        result[name] = _compare(reference, _loss_and_grads(model, ids, autocast))

    check("activation_checkpointing", True)
    check("selective_checkpointing", "selective")
    check("chunked_loss", chunk=args.chunk)
    model.compile_blocks()
    check("compiled")
    check("compiled_and_checkpointed", True)
    check("compiled_and_selective", "selective")
    check("compiled_and_chunked_loss", chunk=args.chunk)
    result |= {name: run(device) for name, run in KERNEL_CHECKS.items()}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
