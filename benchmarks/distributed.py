"""Distributed training on 2 GPUs against 1: loss curves, weak scaling, memory, checkpoint stalls.

Every run is the real command, `torchrun --nproc-per-node N -m dsv3 train --config run.yaml` (one GPU:
`python -m dsv3 train`), on the same data, and every GPU gets the same micro-batch: one GPU runs the
global batch as 2 micro-batches, 2 GPUs as 1 micro-batch each. So the 3 runs see the same samples per
step (their loss curves must match) and the same per-GPU work per forward. Weak scaling (tokens/s per
GPU, target ≥ 90 % of one GPU) compares against `single_1mb` where it was run: one GPU doing exactly a
rank's work a step (one micro-batch and one optimizer step; `single` steps AdamW once per two).

    python benchmarks/distributed.py data   OUT        # byte-level shards of the Python stdlib (no download)
    python benchmarks/distributed.py run    OUT single # 1 GPU, `small` preset, 200 steps
    python benchmarks/distributed.py run    OUT single_1mb # 1 GPU, one micro-batch a step: a rank's work
    python benchmarks/distributed.py run    OUT fsdp   # 2 GPUs, FSDP2 (dp_shard=2)
    python benchmarks/distributed.py run    OUT ep     # 2 GPUs, FSDP2 + expert parallel (ep=2)
    python benchmarks/distributed.py run    OUT ep-allgather # the same, parallel.ep_dispatch=all_gather
    python benchmarks/distributed.py run    OUT fsdp-offload     # 2 GPUs, FSDP2 with CPU offload, 20 steps
    python benchmarks/distributed.py run    OUT save-1gpu-sync   # then -async, save-2gpu-sync, -async:
    python benchmarks/distributed.py run    OUT fsdp --tag zero2 --set parallel.reshard_after_forward=false
                                                       # a variant, in OUT/fsdp-zero2 (--compile: compiled);
                                                       # `report` holds it to OUT/single_1mb-zero2 and
                                                       # OUT/single-zero2, whichever were run
    python benchmarks/distributed.py report OUT        # JSON lines: curves, scaling, memory, stalls
    python benchmarks/distributed.py gradients OUT ep-allgather --compile --set train.dtype=float32
                                # one step's gradients of a 2-GPU layout against one process's
                                # (`dsv3.train.gradient_check`, as the CPU tests check every layout)

Each `run` takes a few minutes on H200s (well under 10) and prints one JSON line; `report` reads the
runs' metrics.jsonl files and prints one JSON line per comparison. `--toy` runs the same commands at
toy size on CPU ranks (gloo), to check the script without GPUs: `python benchmarks/distributed.py all
OUT --toy` does every step.

Peak memory per GPU is `torch.cuda.max_memory_allocated` of the busiest rank against
`dsv3.scaling.memory_per_gpu` (what `dsv3 plan` and `select-config` print), target ±15 %. A
checkpoint's stall is the time the training loop stood still for it (the trainer's `save` records):
synchronous (written, checksummed, published) against background (`train.async_checkpoint`: only the
copy to host memory), target ≤ 10 %, compared on the first save and on the later ones. Checkpoints
are deleted after each run unless --keep-checkpoints (the `small` preset's are 15 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np

from dsv3.config import load_run_config
from dsv3.data.shards import IndexedDatasetWriter
from dsv3.scaling import memory_per_gpu

ROOT = Path(__file__).resolve().parents[1]

# name: (processes, parallel layout, steps, save_every, async)
RUNS: dict[str, tuple[int, list[str], int, int, bool]] = {
    "single": (1, [], 200, 0, False),
    # one GPU doing exactly one 2-GPU rank's work a step: one micro-batch, one optimizer step (`single`
    # runs the 2-GPU global batch as 2 micro-batches: the same samples, but twice the tokens per AdamW
    # step); the weak-scaling baseline when present
    "single_1mb": (1, [], 200, 0, False),
    "fsdp": (2, ["parallel.dp_shard=2"], 200, 0, False),
    "ep": (2, ["parallel.dp_shard=2", "parallel.ep=2"], 200, 0, False),
    # every rank gets both ranks' tokens (fixed-size messages: no host sync per MoE layer)
    "ep-allgather": (2, ["parallel.dp_shard=2", "parallel.ep=2", "parallel.ep_dispatch=all_gather"], 200, 0,
                     False),
    # FSDP2's CPU offload (GPU only): weights, gradients and AdamW state in host memory
    "fsdp-offload": (2, ["parallel.dp_shard=2", "parallel.cpu_offload=true"], 20, 0, False),
    # saves at 40, 80 and 120: the first one's stall includes allocating host buffers where the run
    # has not done so ahead (DCP's stager pins on first use); later ones show the steady state (40
    # steps, ~15 s: each background write of 15 GB has finished before the next save begins)
    "save-1gpu-sync": (1, [], 120, 40, False),
    "save-1gpu-async": (1, [], 120, 40, True),
    "save-2gpu-sync": (2, ["parallel.dp_shard=2"], 120, 40, False),
    "save-2gpu-async": (2, ["parallel.dp_shard=2"], 120, 40, True),
}
TOY_MODEL = [
    "model.vocab_size=256", "model.hidden_size=64", "model.intermediate_size=128",
    "model.moe_intermediate_size=32", "model.num_hidden_layers=2", "model.num_attention_heads=2",
    "model.q_lora_rank=32", "model.kv_lora_rank=32", "model.qk_nope_head_dim=16",
    "model.qk_rope_head_dim=8", "model.v_head_dim=16", "model.n_routed_experts=8",
    "model.num_experts_per_tok=2", "model.n_group=4", "model.topk_group=2",
]


def make_data(out: Path, toy: bool) -> Path:
    """Byte-level token shards (ids 0-255, EOS = 0 after each file) of the Python standard library."""
    data = out / "data"
    if (data / "shard_00000.idx").is_file():
        return data
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    if toy:
        files = files[:200]
    with IndexedDatasetWriter(data / "shard_00000", np.uint16) as w:
        for f in files:
            text = f.read_bytes().replace(b"\x00", b"")
            w.add_document(np.frombuffer(text + b"\x00", dtype=np.uint8).astype(np.uint16))
    return data


def run_config(out: Path, name: str, toy: bool, tag: str = "") -> tuple[int, list[str]]:
    """(processes, --set overrides) of one run, written to OUT/NAME[-TAG]."""
    n, layout, steps, save_every, background = RUNS[name]
    data = make_data(out, toy)
    per_gpu = 2 if toy else 8  # sequences per micro-batch on every GPU
    micro_batches = 1 if name == "single_1mb" else 2  # in the global batch
    overrides = [
        f"data.train=[{data}]", "data.valid=[]", "data.valid_fraction=0.02",
        f"train.output_dir={out / _dir(name, tag)}", f"train.steps={steps if not toy else min(steps, 20)}",
        f"train.global_batch_size={micro_batches * per_gpu}", f"train.micro_batch_size={per_gpu}",
        "train.warmup_steps=20", "train.log_every=10" if not toy else "train.log_every=2",
        "train.eval_every=100", "train.eval_batches=4", "train.tensorboard=false",
        f"train.save_every={save_every}", "train.keep_last=1",
        f"train.async_checkpoint={background}",
        f"parallel.gpus={n}", *layout,
    ]
    if toy:  # later keys win
        overrides += [*TOY_MODEL, "train.seq_len=64", "train.device=cpu", "train.eval_every=10",
                      f"train.save_every={5 if save_every else 0}"]
    return n, overrides


def _dir(name: str, tag: str) -> str:
    return f"{name}-{tag}" if tag else name


def run(
    out: Path, name: str, toy: bool, compile_: bool, keep: bool = False, extra: list[str] | None = None,
    tag: str = "",
) -> dict:
    """One training run through the CLI; its summary line."""
    config = write_config(out, name, toy, compile_, extra, tag)
    _launch(config, ["-m", "dsv3", "train", "--config", str(config)], quiet=toy)
    name = _dir(name, tag)
    summary = summarize(out, name)
    if not keep:  # the small preset's checkpoints are 15 GB each (weights and AdamW state in fp32)
        for step in (out / name).glob("step_*"):
            shutil.rmtree(step)
    return summary


def write_config(
    out: Path, name: str, toy: bool, compile_: bool, extra: list[str] | None = None, tag: str = ""
) -> Path:
    """OUT/NAME[-TAG]/run.yaml for one run (the directory emptied first: a rerun starts over)."""
    _, overrides = run_config(out, name, toy, tag)
    if compile_:
        overrides.append("train.compile=true")
    cfg = load_run_config("small", [*overrides, *(extra or [])])
    directory = out / _dir(name, tag)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    config = directory / "run.yaml"
    config.write_text(json.dumps(cfg.model_dump(mode="json")))  # JSON is YAML
    return config


def _launch(config: Path, command: list[str], quiet: bool) -> None:
    """`python COMMAND` on the run's processes (torchrun for more than one); `quiet`: no stdout."""
    n = load_run_config(config).parallel.gpus
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n)] if n > 1 else [
        sys.executable]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{os.environ.get('PYTHONPATH', '')}"}
    subprocess.run([*launcher, *command], check=True, env=env, stdout=subprocess.DEVNULL if quiet else None)


def gradients(out: Path, name: str, toy: bool, compile_: bool, extra: list[str] | None = None,
              tag: str = "") -> None:
    """One step's gradients of run NAME's layout against one process's (`dsv3.train.gradient_check`),
    on its processes; rank 0 prints the JSON line."""
    if RUNS[name][0] < 2:
        raise SystemExit(f"gradients: {name} runs in one process; name a run of 2 GPUs")
    config = write_config(out, name, toy, compile_, extra, f"{tag}-grad" if tag else "grad")
    worker = ROOT / "benchmarks" / "parallel_gradients.py"
    _launch(config, [str(worker), "--config", str(config)], quiet=False)


def _records(out: Path, name: str) -> list[dict]:
    path = out / name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def summarize(out: Path, name: str) -> dict:
    """Tokens/s per GPU (after the first 20% of the steps), peak memory against the estimate, stalls."""
    records = _records(out, name)
    cfg = load_run_config(out / name / "run.yaml")
    train = [r for r in records if r["kind"] == "train"]
    steady = [r["tokens_per_s_per_gpu"] for r in train if r["step"] > 0.2 * cfg.train.steps] or [
        r["tokens_per_s_per_gpu"] for r in train]
    estimate = memory_per_gpu(cfg.model, cfg.train, cfg.parallel)
    peak = max((r.get("peak_gpu_mem_gb", 0.0) for r in train), default=0.0)
    saves = [r for r in records if r["kind"] == "save"]
    ep_imbalance = [r["ep_imbalance"] for r in train if "ep_imbalance" in r]
    return {
        "run": name, "gpus": cfg.parallel.gpus,
        "layout": cfg.parallel.model_dump(include={"dp_shard", "ep", "ep_dispatch", "reshard_after_forward",
                                                          "fsdp_unit_blocks", "grad_sync"}),
        "micro_batches_per_gpu": cfg.train.global_batch_size // cfg.train.micro_batch_size // cfg.parallel.dp,
        "steps": train[-1]["step"] if train else 0, "final_loss": train[-1]["lm_loss"] if train else None,
        "tokens_per_s_per_gpu": statistics.median(steady) if steady else None,
        "peak_gpu_mem_gb": peak or None, "estimate_gb": estimate.total / 1e9,
        "peak_over_estimate": peak / (estimate.total / 1e9) if peak else None,
        # the busiest expert-parallel rank's routed rows over the mean rank's (each MoE layer waits for it)
        "ep_imbalance": round(statistics.mean(ep_imbalance), 3) if ep_imbalance else None,
        "save_stall_s": [round(r["stall_s"], 3) for r in saves],
        "background_save": bool(saves and saves[0]["background"]),
    }


def report(out: Path) -> list[dict]:
    """The comparisons the issue asks for, one JSON object each."""
    lines = []
    # a run's tag (`-m16` of `fsdp-m16`) pairs it with the one-GPU runs of the same tag, never another's
    one_gpu = [d.name for d in out.iterdir() if d.name.startswith(("single-", "single_1mb-"))]
    tags = {"-" + name.split("-", 1)[1] for name in one_gpu}
    two_gpu = [d.name for d in sorted(out.iterdir()) if d.name.split("-")[0] in ("fsdp", "ep")]
    for name in two_gpu:
        tag = max((t for t in tags if name.endswith(t)), key=len, default="")
        # `single`: the same samples a step (2 micro-batches), so the loss curves compare; `single_1mb`:
        # exactly a rank's work a step, the weak-scaling baseline where it was run
        same_batch, work = ("single" + tag, "single_1mb" + tag)
        have = [run for run in (work, same_batch) if _records(out, run)]
        if not _records(out, name) or not have:
            continue
        s, alone = summarize(out, name), summarize(out, have[0])
        line = {
            "compare": f"{name} (2 GPUs) vs {' and '.join(have)} (1 GPU)",
            "weak_scaling": s["tokens_per_s_per_gpu"] / alone["tokens_per_s_per_gpu"],
            "weak_scaling_baseline": have[0],
            "tokens_per_s_per_gpu": {have[0]: alone["tokens_per_s_per_gpu"], name: s["tokens_per_s_per_gpu"]},
            "final_lm_loss": {have[0]: alone["final_loss"], name: s["final_loss"]},
            "peak_gpu_mem_gb": {have[0]: alone["peak_gpu_mem_gb"], name: s["peak_gpu_mem_gb"]},
            "estimate_gb": {have[0]: alone["estimate_gb"], name: s["estimate_gb"]},
            "ep_imbalance": s["ep_imbalance"],
        }
        if _records(out, same_batch):
            single = summarize(out, same_batch)
            curve = {r["step"]: r["lm_loss"] for r in _records(out, same_batch) if r["kind"] == "train"}
            other = {r["step"]: r["lm_loss"] for r in _records(out, name) if r["kind"] == "train"}
            diffs = [abs(other[k] - curve[k]) for k in curve if k in other]
            line["vs_single_two_micro_batches"] = s["tokens_per_s_per_gpu"] / single["tokens_per_s_per_gpu"]
            line["tokens_per_s_per_gpu"][same_batch] = single["tokens_per_s_per_gpu"]
            line["loss_curve_max_abs_diff"] = max(diffs) if diffs else None
            line["loss_curve_mean_abs_diff"] = statistics.mean(diffs) if diffs else None
        lines.append(line)
    for gpus in ("1gpu", "2gpu"):
        sync, background = f"save-{gpus}-sync", f"save-{gpus}-async"
        if _records(out, sync) and _records(out, background):
            a, b = summarize(out, sync)["save_stall_s"], summarize(out, background)["save_stall_s"]
            first = b[0] / a[0] if a and b and a[0] else None
            later = statistics.mean(b[1:]) / statistics.mean(a[1:]) if len(a) > 1 and len(b) > 1 else None
            lines.append({"compare": f"checkpoint stall, {gpus}: background vs synchronous", "sync_s": a,
                          "async_s": b, "first_save_ratio": first, "later_saves_ratio": later})
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["data", "run", "gradients", "report", "all"])
    p.add_argument("out", type=Path)
    p.add_argument("name", nargs="?", choices=list(RUNS), help="run: which one")
    p.add_argument("--toy", action="store_true", help="toy size on CPU ranks (gloo): checks the script")
    p.add_argument("--compile", action="store_true", help="torch.compile the blocks in every run")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoints (15 GB each)")
    p.add_argument("--tag", default="", help="run: write to OUT/NAME-TAG (the run with other --set values)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a further config override for the runs, e.g. train.profile_steps=3 (repeatable)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.what == "data":
        print(json.dumps({"data": str(make_data(args.out, args.toy))}))
    elif args.what in ("run", "gradients"):
        if args.name is None:
            p.error(f"{args.what}: name one of " + ", ".join(RUNS))
        if args.what == "gradients":
            gradients(args.out, args.name, args.toy, args.compile, args.set, args.tag)
            return
        summary = run(args.out, args.name, args.toy, args.compile, args.keep_checkpoints, args.set, args.tag)
        print(json.dumps(summary), flush=True)
    else:
        for name in [n for n in RUNS if not (args.toy and n == "fsdp-offload")] if args.what == "all" else []:
            summary = run(args.out, name, args.toy, args.compile, args.keep_checkpoints, args.set)
            print(json.dumps(summary), flush=True)
        for line in report(args.out):
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
