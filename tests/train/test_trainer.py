"""The training loop: exact resume, learning, balancing, the NaN guard, and one-line errors."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch

from dsv3.cli import main
from dsv3.config import ConfigError
from dsv3.train.optim import build_optimizer
from dsv3.train.trainer import Trainer, TrainingDiverged, train
from tests.conftest import micro_run, poison_loss

# What must match bit for bit between an uninterrupted run and an interrupted-and-resumed one.
EXACT_KEYS = (
    "loss", "lm_loss", "mtp_loss", "grad_norm", "lr", "tokens", "expert_load", "expert_bias", "val_loss",
)
# What a record holds about the machine and the clock rather than the step.
TIMING = {
    "tokens_per_s", "tokens_per_s_per_gpu", "mfu", "elapsed_s", "eta_s", "peak_rss_gb", "peak_gpu_mem_gb",
}


def _records(path, kinds=("train", "eval")):
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return [(r["kind"], r["step"], {k: r.get(k) for k in EXACT_KEYS}) for r in rows if r["kind"] in kinds]


@pytest.mark.parametrize(("background", "moments", "weights"),
                         [(False, "float32", "float32"), (True, "float32", "float32"),
                          (False, "bfloat16", "float32"), (True, "bfloat16", "bfloat16")],
                         ids=["sync", "async", "bf16-moments", "bf16-weights"])
def test_interrupted_and_resumed_run_is_bit_identical(tmp_path, corpus_shards, background, moments, weights):
    """bf16 weights too: the checkpoint holds their float32 masters, which the resumed run starts from."""
    train_dir, valid_dir = corpus_shards
    mode = (f"train.async_checkpoint={background}", f"train.optimizer_state_dtype={moments}",
            f"train.param_dtype={weights}")
    full = train(micro_run(tmp_path / "full", train_dir, valid_dir, *mode))

    def interrupt(record):  # after the step-6 checkpoint, mid-way to the next one
        if record["kind"] == "train" and record["step"] == 9:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(micro_run(tmp_path / "cut", train_dir, valid_dir, *mode), on_record=interrupt)
    resumed = train(micro_run(tmp_path / "cut", train_dir, valid_dir, *mode), resume="auto")
    saves = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    saves = [r for r in saves if r["kind"] == "save"]
    assert [r["step"] for r in saves] == [6, 12] and all(r["background"] is background for r in saves)

    expected, got = _records(tmp_path / "full"), _records(tmp_path / "cut")
    assert len(expected) == 12 + 2 and got == expected  # float equality: bit-identical
    assert resumed.val_loss == full.val_loss
    final_full = full.last_checkpoint / "model.safetensors"
    final_cut = resumed.last_checkpoint / "model.safetensors"
    assert final_full.read_bytes() == final_cut.read_bytes()


def test_loss_on_a_fixed_corpus_falls_below_threshold(tmp_path, corpus_shards):
    """Byte-level LM on tests/fixtures/tiny_corpus.txt: from ln 256 = 5.55 nats to below 2.75 in 60 steps."""
    train_dir, valid_dir = corpus_shards
    records = []
    result = train(
        micro_run(tmp_path / "run", train_dir, valid_dir, "train.steps=60", "train.eval_every=60",
                  "train.save_every=60"),
        on_record=records.append,
    )
    lm = [r["lm_loss"] for r in records if r["kind"] == "train"]
    assert lm[0] > 5.0
    assert np.mean(lm[-10:]) < 2.75
    assert result.val_loss < result.unigram_loss - 0.2  # learned more than token frequencies
    assert result.val_ppl == pytest.approx(math.exp(result.val_loss))
    assert {p.name for p in result.plots} == {"loss_curve.png", "expert_load.png"}
    assert all(p.stat().st_size > 1000 for p in result.plots)


def _final_imbalance(tmp_path, train_dir, gamma: float) -> float:
    records = []
    train(
        micro_run(tmp_path / f"gamma_{gamma}", train_dir, None, "train.steps=100", "train.eval_every=1000",
                  "train.save_every=1000", "train.mtp_lambda=0", f"train.bias_update_speed={gamma}"),
        on_record=records.append,
    )
    last = [r["imbalance_max"] for r in records if r["kind"] == "train"][-10:]
    return float(np.mean(last))


def test_bias_update_lowers_expert_imbalance(tmp_path, corpus_shards):
    """After 100 steps the max/mean expert load is lower with γ > 0 than without balancing."""
    train_dir, _ = corpus_shards
    unbalanced = _final_imbalance(tmp_path, train_dir, 0.0)
    balanced = _final_imbalance(tmp_path, train_dir, 0.01)
    assert balanced < 0.75 * unbalanced, (balanced, unbalanced)


def test_gradient_accumulation_matches_one_big_batch(tmp_path, corpus_shards):
    train_dir, valid_dir = corpus_shards
    losses = {}
    for micro in (8, 2):
        trainer = Trainer(micro_run(tmp_path / f"m{micro}", train_dir, valid_dir,
                                    f"train.micro_batch_size={micro}", "train.mtp_lambda=0"))
        records = [trainer.train_step() for _ in range(3)]
        losses[micro] = [r["loss"] for r in records]
        trainer.metrics.close()
    assert losses[2] == pytest.approx(losses[8], rel=1e-5)


def test_switches_turn_losses_on_and_off(tmp_path, corpus_shards):
    train_dir, valid_dir = corpus_shards
    trainer = Trainer(micro_run(tmp_path / "a", train_dir, valid_dir, "train.mtp_lambda=0",
                                "train.balance_alpha=0.01"))
    r = trainer.train_step()
    assert r["mtp_loss"] == 0.0 and r["balance_loss"] > 0
    assert r["loss"] == pytest.approx(r["lm_loss"] + r["balance_loss"], rel=1e-6)
    trainer.metrics.close()
    trainer = Trainer(micro_run(tmp_path / "b", train_dir, valid_dir, "train.mtp_lambda=0.5",
                                "train.balance_alpha=0"))
    r = trainer.train_step()
    assert r["mtp_loss"] > 0 and r["balance_loss"] == 0.0
    trainer.metrics.close()


def test_non_finite_steps_are_skipped_then_training_goes_on(tmp_path, corpus_shards):
    train_dir, valid_dir = corpus_shards
    records = []
    trainer = Trainer(micro_run(tmp_path / "run", train_dir, valid_dir), on_record=records.append)
    poison_loss(trainer, {3, 4})
    before = {}

    def snapshot(record):
        records.append(record)
        if record["kind"] in ("train", "skip"):
            before[record["step"]] = trainer.model.lm_head.weight.detach().clone()

    trainer.on_record = snapshot
    result = trainer.fit()
    kinds = {r["step"]: r["kind"] for r in records if r["kind"] in ("train", "skip")}
    assert kinds[3] == kinds[4] == "skip" and kinds[5] == "train" and result.step == 12
    assert torch.equal(before[2], before[4])  # skipped steps leave the weights alone
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())

    def no_nan(token):
        raise AssertionError(f"metrics.jsonl holds {token}: not strict JSON")

    rows = [json.loads(line, parse_constant=no_nan) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["loss"] for r in rows if r["kind"] == "skip"] == [None, None]


def test_a_step_skipped_on_the_device_and_read_a_step_late_gives_the_same_run(tmp_path, corpus_shards):
    """The GPU path (fused AdamW skips on its found_inf flag, numbers read back while the next step runs)
    against the host path (the flag read, then fused AdamW): the same records and the same weights."""
    train_dir, valid_dir = corpus_shards
    runs = {}
    for on_device in (False, True):
        records = []
        cfg = micro_run(tmp_path / str(on_device), train_dir, valid_dir)
        trainer = Trainer(cfg, on_record=records.append)
        trainer.optimizer = build_optimizer(trainer.model, trainer.tc, fused=True)
        trainer.skip_on_device = trainer.read_late = on_device
        poison_loss(trainer, {3, 4, 8})
        trainer.fit()
        steps = [{k: v for k, v in r.items() if k not in TIMING}
                 for r in records if r["kind"] in ("train", "skip")]
        runs[on_device] = steps, trainer.model.state_dict()
    (host_steps, host_weights), (device_steps, device_weights) = runs[False], runs[True]
    assert [r["kind"] for r in device_steps].count("skip") == 3
    assert json.dumps(device_steps) == json.dumps(host_steps)
    assert all(torch.equal(device_weights[k], host_weights[k]) for k in host_weights)


def test_clipping_folded_into_the_bf16_moment_update_gives_the_same_run(tmp_path, corpus_shards):
    """MixedAdamW scales the gradients by the clipping factor as it reads them (no in-place rewrite):
    the same records and weights as clipping in place first, with clipping active every step."""
    runs = {}
    for fold in (False, True):
        records = []
        cfg = micro_run(tmp_path / str(fold), *corpus_shards, "train.optimizer_state_dtype=bfloat16",
                        "train.grad_clip=0.05")
        trainer = Trainer(cfg, on_record=records.append)
        assert trainer.fold_clipping  # the default with these moments
        trainer.fold_clipping = fold
        poison_loss(trainer, {4})
        trainer.fit()
        steps = [{k: v for k, v in r.items() if k not in TIMING}
                 for r in records if r["kind"] in ("train", "skip")]
        runs[fold] = steps, trainer.model.state_dict()
    (plain, plain_weights), (folded, folded_weights) = runs[False], runs[True]
    assert all(r["grad_norm"] > 0.05 for r in plain if r["kind"] == "train")  # clipped every step
    assert json.dumps(folded) == json.dumps(plain)
    assert all(torch.equal(folded_weights[k], plain_weights[k]) for k in plain_weights)


def test_too_many_bad_steps_in_a_row_stop_the_run(tmp_path, corpus_shards):
    train_dir, valid_dir = corpus_shards
    trainer = Trainer(micro_run(tmp_path / "run", train_dir, valid_dir, "train.max_bad_steps=3"))
    poison_loss(trainer, set(range(2, 100)))
    with pytest.raises(TrainingDiverged, match="3 non-finite steps in a row .* at step 4"):
        trainer.fit()


# --- one-line errors through the CLI ------------------------------------------------------------


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    return err


def _yaml(path, cfg) -> str:
    path.write_text(json.dumps(cfg.model_dump(mode="json")))  # JSON is YAML
    return str(path)


def test_bad_config_is_one_line(tmp_path, capsys, corpus_shards):
    cfg = micro_run(tmp_path / "run", *corpus_shards)
    data = cfg.model_dump(mode="json")
    data["train"]["stepz"] = 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps(data))
    assert "train.stepz: unknown key" in _one_line_error(capsys, ["train", "--config", str(bad)])
    err = _one_line_error(capsys, ["train", "--config", _yaml(tmp_path / "ok.yaml", cfg),
                                   "--set", "train.global_batch_size=6"])
    assert "must be a multiple of micro_batch_size" in err


def test_missing_shards_are_one_line(tmp_path, capsys, corpus_shards):
    train_dir, valid_dir = corpus_shards
    (train_dir / "shard_00000.bin").unlink()
    cfg = micro_run(tmp_path / "run", train_dir, valid_dir)
    err = _one_line_error(capsys, ["train", "--config", _yaml(tmp_path / "run.yaml", cfg)])
    assert "data.train" in err and "shard_00000.bin" in err


def test_resuming_a_different_model_is_one_line(tmp_path, capsys, corpus_shards):
    cfg = micro_run(tmp_path / "run", *corpus_shards, "train.steps=6")
    path = _yaml(tmp_path / "run.yaml", cfg)
    assert main(["train", "--config", path]) == 0
    capsys.readouterr()
    argv = ["train", "--config", path, "--resume", "auto", "--set", "model.hidden_size=96"]
    err = _one_line_error(capsys, argv)
    assert "step_000006: a different model than the run config: hidden_size 64 (checkpoint) != 96" in err
    err = _one_line_error(capsys, ["train", "--config", path])  # a fresh run would overwrite the old one
    assert "already holds checkpoints" in err and "--resume auto" in err


# --- options ------------------------------------------------------------------------------------


def test_activation_checkpointing_gives_the_same_step(tmp_path, corpus_shards):
    losses, grads = {}, {}
    for ac in (False, True, "selective"):
        cfg = micro_run(tmp_path / f"ac{ac}", *corpus_shards, f"train.activation_checkpointing={ac}")
        trainer = Trainer(cfg)
        assert trainer.model.activation_checkpointing == ac
        losses[ac] = [trainer.train_step()["loss"] for _ in range(2)]
        grads[ac] = trainer.model.lm_head.weight.detach().clone()
        trainer.metrics.close()
    for ac in (True, "selective"):
        assert losses[ac] == pytest.approx(losses[False], rel=1e-6)
        torch.testing.assert_close(grads[ac], grads[False])


def test_bf16_weights_with_float32_masters_train_like_float32_weights(tmp_path, corpus_shards):
    """train.param_dtype=bfloat16: the model computes with bf16 weights (buffers such as the routing
    bias stay float32), each the rounding of its float32 master, which the checkpoint holds; its two
    micro-batches' gradients add up in float32; the losses follow float32 weights' to bf16's
    precision and the run learns."""
    from safetensors.torch import load_file

    from dsv3.model.hf import hf_tensor_table

    runs = {}
    for weights in ("float32", "bfloat16"):
        records = []
        # the same moments for both (auto would give bf16 weights bf16 moments)
        cfg = micro_run(tmp_path / weights, *corpus_shards, f"train.param_dtype={weights}", "train.steps=30",
                        "train.eval_every=30", "train.save_every=30", "train.optimizer_state_dtype=float32")
        trainer = Trainer(cfg, on_record=records.append)
        result = trainer.fit()
        runs[weights] = [r["lm_loss"] for r in records if r["kind"] == "train"]
    model = trainer.model
    assert records[0]["precision"] == "bf16 weights + fp32 masters, bf16 compute, fp32 AdamW moments"
    assert trainer.n_micro == 2 and trainer.fp32_grads is not None  # micro-batches sum in float32
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(m.gate.e_score_correction_bias.dtype == torch.float32 for m in model.moe_layers())
    for p in model.parameters():
        master = trainer.masters[p]
        assert master.dtype == torch.float32 and torch.equal(p, master.to(torch.bfloat16))
    saved = load_file(str(result.last_checkpoint / "model.safetensors"))
    state, table = model.state_dict(), hf_tensor_table(model)
    name, spec = next((n, s) for n, s in table.items() if n.endswith("mlp.experts.0.gate_proj.weight"))
    assert saved[name].dtype == torch.float32
    assert torch.equal(saved[name], state[spec.key][spec.index])  # the master, not the bf16 weight
    assert not torch.equal(saved[name], saved[name].bfloat16().float())
    bf16, fp32 = runs["bfloat16"], runs["float32"]
    assert bf16[0] == pytest.approx(fp32[0], rel=1e-2)
    assert np.mean(bf16[-10:]) == pytest.approx(np.mean(fp32[-10:]), rel=0.03)
    assert np.mean(bf16[-5:]) < bf16[0] - 1.5  # it learns


@pytest.mark.slow
def test_compiled_blocks_and_whole_model_train_like_eager(tmp_path, corpus_shards):
    """train.compile: true (each block) and model (the whole training forward, with MTP and the
    balance loss): eager's losses."""
    losses = {}
    for compile_ in ("false", "true", "model"):
        trainer = Trainer(micro_run(tmp_path / f"c{compile_}", *corpus_shards, f"train.compile={compile_}"))
        losses[compile_] = [trainer.train_step()["loss"] for _ in range(3)]
        trainer.metrics.close()
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4)
    assert losses["model"] == pytest.approx(losses["false"], rel=1e-4)


def test_tensorboard_and_metrics_files(tmp_path, corpus_shards):
    result = train(micro_run(tmp_path / "run", *corpus_shards, "train.steps=6", "train.tensorboard=true"))
    assert list((result.output_dir / "tensorboard").glob("events.out.tfevents.*"))
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    run = rows[0]
    assert run["kind"] == "run" and run["kv_cache_bytes_per_token"] > 0 and run["unigram_loss"] > 0
    assert run["moe_layers"] == ["model.layers.1.mlp", "mtp.0.block.mlp"]
    assert run["precision"] == "fp32 weights, fp32 compute, fp32 AdamW moments"  # param_dtype auto on a CPU
    step = next(r for r in rows if r["kind"] == "train")
    for key in ("tokens_per_s", "eta_s", "peak_rss_gb", "imbalance", "load_entropy", "expert_bias", "lr"):
        assert key in step, key
    assert len(step["expert_load"]) == 2 and sum(step["expert_load"][0]) == 4 * 32 * 2 * 2  # B·T·k·micro
    ev = next(r for r in rows if r["kind"] == "eval")
    assert ev["router_entropy"][0] is not None and 0 < ev["router_entropy"][0] <= 1
    assert ev["router_entropy"][1] is None  # the MTP layer does not run when validating the LM


def test_save_every_zero_keeps_no_checkpoint(tmp_path, corpus_shards):
    """A throughput run: it trains and validates, and writes no checkpoint, not even at the end."""
    result = train(micro_run(tmp_path / "run", *corpus_shards, "train.steps=3", "train.save_every=0"))
    assert result.last_checkpoint is None and result.val_loss > 0
    assert not list(result.output_dir.glob("step_*"))


def test_profile_window_writes_a_kernel_table_and_a_trace(tmp_path, corpus_shards):
    result = train(micro_run(tmp_path / "run", *corpus_shards, "train.steps=6", "train.profile_from=3",
                             "train.profile_steps=2"))
    profile = result.output_dir / "profile"
    table = (profile / "rank0.txt").read_text()
    assert "steps 3-4 (2), rank 0" in table and "aten::mm" in table  # the model's GEMMs were recorded
    assert json.loads((profile / "rank0.json").read_text())["traceEvents"]
    assert not list(profile.glob(".*"))  # no temp left behind


def test_a_profile_window_past_the_end_still_writes(tmp_path, corpus_shards):
    result = train(micro_run(tmp_path / "run", *corpus_shards, "train.steps=3", "train.profile_from=2",
                             "train.profile_steps=5"))
    assert (result.output_dir / "profile" / "rank0.txt").is_file()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_without_the_package_is_one_line(tmp_path, capsys, corpus_shards):
    cfg = micro_run(tmp_path / "run", *corpus_shards, "train.wandb=true")
    err = _one_line_error(capsys, ["train", "--config", _yaml(tmp_path / "run.yaml", cfg)])
    assert "pip install 'dsv3[wandb]'" in err


def test_a_launch_that_does_not_match_the_layout_is_one_line(tmp_path, corpus_shards, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"dp_replicate\*dp_shard\*tp\*pp = 1 .* has WORLD_SIZE=2"):
        Trainer(micro_run(tmp_path / "run", *corpus_shards))


def test_a_multi_device_layout_without_torchrun_is_one_line(tmp_path, corpus_shards):
    cfg = micro_run(tmp_path / "run", *corpus_shards, "parallel.gpus=2", "parallel.dp_shard=2")
    with pytest.raises(ConfigError, match="needs 2 processes: launch with torchrun --nproc-per-node 2"):
        Trainer(cfg)


def test_cpu_offload_without_a_gpu_is_one_line(tmp_path, corpus_shards, monkeypatch):
    cfg = micro_run(tmp_path / "run", *corpus_shards, "parallel.cpu_offload=true")
    with pytest.raises(ConfigError, match="cpu_offload needs FSDP"):
        Trainer(cfg)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: refused before joining a process group
    cfg = micro_run(tmp_path / "run", *corpus_shards, "parallel.cpu_offload=true", "parallel.gpus=2",
                    "parallel.dp_shard=2")
    with pytest.raises(ConfigError, match="cpu_offload keeps GPU state in host memory: needs train.device"):
        Trainer(cfg)
