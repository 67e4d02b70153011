"""Checkpoints round-trip exactly, without pickle; damaged or foreign ones are refused in one line."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dsv3.checkpoints import CheckpointError, best_checkpoint, list_checkpoints, verify_checkpoint
from dsv3.config import RunConfig, TrainConfig, load_model_config
from dsv3.io import temp_path
from dsv3.model import Transformer
from dsv3.train import checkpoint as ckpt
from dsv3.train.optim import build_optimizer
from tests.conftest import MICRO_MODEL


def _micro(*extra: str):
    return load_model_config("tiny", [o.removeprefix("model.") for o in [*MICRO_MODEL, *extra]])


def _trained(cfg, steps: int = 2):
    """A model and optimizer after a few real steps, so the AdamW moments are non-trivial."""
    model = Transformer(cfg, seed=1)
    opt = build_optimizer(model, TrainConfig(lr=1e-2, warmup_steps=0))
    ids = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        out = model.forward_with_losses(ids[:, :-1], ids[:, 1:], mtp_lambda=0.3)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        model.update_bias(0.01)
    return model, opt


def _save(tmp_path, model, opt, step: int, val_loss: float | None = None):
    run = RunConfig(model=model.config)
    return ckpt.save_checkpoint(
        tmp_path, step, model=model, optimizer=opt, trainer_state={"val_loss": val_loss, "sampler": {}},
        run_config=run,
    )


def test_round_trip_is_exact_and_pickle_free(tmp_path):
    cfg = _micro()
    model, opt = _trained(cfg)
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(6)
    path = _save(tmp_path, model, opt, 7)
    expected_rng = (torch.rand(3), random.random(), np.random.rand())

    assert path.name == "step_000007" and list_checkpoints(tmp_path) == [path]
    names = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert {"config.json", "model.safetensors", "manifest.json", "trainer/optimizer.safetensors",
            "trainer/rng.safetensors", "trainer/state.json", "trainer/run_config.json"} <= names
    assert not any(n.endswith((".pt", ".bin", ".pkl")) for n in names)

    loaded = ckpt.load_model(path, cfg)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    opt2 = build_optimizer(loaded, TrainConfig())
    state = ckpt.restore_training_state(path, loaded, opt2)
    assert state["step"] == 7
    for p1, p2 in zip(model.parameters(), loaded.parameters(), strict=True):
        s1, s2 = opt.state[p1], opt2.state[p2]
        assert torch.equal(s1["exp_avg"], s2["exp_avg"]) and torch.equal(s1["exp_avg_sq"], s2["exp_avg_sq"])
        assert float(s1["step"]) == float(s2["step"])
    got_rng = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got_rng[0], expected_rng[0]) and got_rng[1:] == expected_rng[1:]
    # The router bias, moved by update_bias, is part of the HF layout and comes back exactly.
    biases = [m.gate.e_score_correction_bias for m in loaded.moe_layers()]
    assert any(b.abs().sum() > 0 for b in biases)


def test_optimizer_tensors_are_keyed_by_parameter_name(tmp_path):
    model, opt = _trained(_micro())
    path = _save(tmp_path, model, opt, 1)
    keys = load_file(str(path / "trainer" / "optimizer.safetensors")).keys()
    assert "lm_head.weight/exp_avg" in keys and "model.norm.weight/exp_avg_sq" in keys


def test_damaged_checkpoints_are_skipped_by_auto_and_refused_by_name(tmp_path):
    model, opt = _trained(_micro())
    first = _save(tmp_path, model, opt, 1)
    second = _save(tmp_path, model, opt, 2)
    assert ckpt.resolve_resume("auto", tmp_path) == second

    weights = second / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # truncated
    assert list_checkpoints(tmp_path) == [first]
    assert ckpt.resolve_resume("auto", tmp_path) == first
    with pytest.raises(CheckpointError, match=r"model.safetensors: \d+ bytes, manifest says \d+"):
        ckpt.resolve_resume(str(second), tmp_path)

    (first / "trainer" / "optimizer.safetensors").unlink()
    with pytest.raises(CheckpointError, match="optimizer.safetensors: missing file listed in the"):
        verify_checkpoint(first)
    assert ckpt.resolve_resume("auto", tmp_path) is None


def test_altered_bytes_fail_the_checksum(tmp_path):
    model, opt = _trained(_micro())
    path = _save(tmp_path, model, opt, 1)
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    weights.write_bytes(bytes(data))
    verify_checkpoint(path)  # sizes alone still match ...
    with pytest.raises(CheckpointError, match="checksum differs"):
        ckpt.load_model(path, model.config)  # ... but loading checks every byte


def test_a_different_model_is_refused_naming_the_fields(tmp_path):
    model, opt = _trained(_micro())
    path = _save(tmp_path, model, opt, 1)
    other = _micro("model.hidden_size=96", "model.num_hidden_layers=3")
    with pytest.raises(CheckpointError) as err:
        ckpt.load_model(path, other)
    msg = str(err.value)
    assert "\n" not in msg
    assert "hidden_size 64 (checkpoint) != 96 (config)" in msg
    assert "num_hidden_layers 2 (checkpoint) != 3 (config)" in msg


def test_cut_off_save_is_invisible_and_cleaned(tmp_path):
    model, opt = _trained(_micro())
    good = _save(tmp_path, model, opt, 1)
    cut = temp_path(tmp_path / "step_000002")
    cut.mkdir()
    (cut / "model.safetensors").write_bytes(b"partial")
    no_manifest = tmp_path / "step_000003"  # e.g. copied by hand without its manifest
    no_manifest.mkdir()
    (no_manifest / "config.json").write_text("{}")
    assert list_checkpoints(tmp_path) == [good]
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        ckpt.resolve_resume(str(no_manifest), tmp_path)
    ckpt.remove_stale_temps(tmp_path)
    assert not cut.exists() and good.exists()


def test_keep_last_k_plus_the_best(tmp_path):
    model, opt = _trained(_micro())
    for step, val in [(1, 3.0), (2, 1.0), (3, 2.0), (4, None), (5, 2.5)]:
        _save(tmp_path, model, opt, step, val)
        ckpt.prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002", "step_000004", "step_000005"]
    assert best_checkpoint(tmp_path).name == "step_000002"
    assert not list(tmp_path.glob(".*"))


def test_manifest_lists_sizes_and_checksums(tmp_path):
    model, opt = _trained(_micro())
    path = _save(tmp_path, model, opt, 1)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 1
    for name, meta in manifest["files"].items():
        assert (path / name).stat().st_size == meta["bytes"] and len(meta["sha256"]) == 64
