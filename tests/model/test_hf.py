"""HF checkpoint interchange: FP8, shards, MTP layers, both rope spellings, one-line errors, convert."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsv3.cli import main
from dsv3.model.fp8 import dequantize_fp8, quantize_fp8
from dsv3.model.hf import CheckpointError, convert_hf, load_hf, read_hf_config, save_hf
from dsv3.model.transformer import Transformer


def _model(cfg, seed: int = 0) -> Transformer:
    model = Transformer(cfg, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10)
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.1)
    return model


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


def _assert_same_state(a: Transformer, b: Transformer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_sharded_round_trip_keeps_mtp_and_router_bias(tmp_path, make_config):
    cfg = make_config(num_nextn_predict_layers=2)
    model = _model(cfg)
    save_hf(model, tmp_path / "ckpt", max_shard_size="60KB")
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and all((tmp_path / "ckpt" / f).is_file() for f in files)
    L = cfg.num_hidden_layers
    names = index["weight_map"]
    # the published layout: per-expert tensors, MTP as decoder layers L, L+1 with their own copies
    assert f"model.layers.{L - 1}.mlp.experts.7.up_proj.weight" in names
    for d in (0, 1):
        for leaf in (
            "enorm.weight",
            "eh_proj.weight",
            "shared_head.norm.weight",
            "shared_head.head.weight",
            "embed_tokens.weight",
            "self_attn.kv_b_proj.weight",
            "mlp.experts.0.gate_proj.weight",
        ):
            assert f"model.layers.{L + d}.{leaf}" in names
    loaded = load_hf(tmp_path / "ckpt")
    _assert_same_state(model, loaded)
    assert not list(tmp_path.glob(".*"))  # no temp directory left behind


def test_bfloat16_save_and_load(tmp_path, make_config):
    cfg = make_config()
    model = _model(cfg)
    save_hf(model, tmp_path / "bf16", dtype="bfloat16")
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["model_type"] == "deepseek_v3"
    tensors = _read_all(tmp_path / "bf16")
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    loaded = load_hf(tmp_path / "bf16")  # the config's dtype by default
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.bfloat16())


def _write_fp8_checkpoint(src: Path, dst: Path) -> dict[str, torch.Tensor]:
    """Quantize a checkpoint the way DeepSeek publishes V3: linear weights in FP8 with block scales,
    embeddings, head, norms and router in bf16; two shards, with scales in the other shard."""
    tensors = _read_all(src)
    shards: list[dict[str, torch.Tensor]] = [{}, {}]
    expected = {}
    for i, (name, t) in enumerate(sorted(tensors.items())):
        keep = t.dim() != 2 or "embed_tokens" in name or "head" in name or name.endswith("mlp.gate.weight")
        if keep:
            shards[i % 2][name] = t
            expected[name] = t.float()
        else:
            q, scale = quantize_fp8(t)
            shards[i % 2][name] = q
            shards[(i + 1) % 2][name + "_scale_inv"] = scale
            expected[name] = dequantize_fp8(q, scale)
    dst.mkdir()
    weight_map = {}
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-00002.safetensors"
        save_file(shard, str(dst / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "weight_block_size": [128, 128],
        "activation_scheme": "dynamic",
    }
    config.pop("dtype")  # DeepSeek's config.json declares only torch_dtype
    config["torch_dtype"] = "bfloat16"
    (dst / "config.json").write_text(json.dumps(config))
    return expected


def test_fp8_checkpoint_is_dequantized_on_load(tmp_path, make_config):
    # widths that are not multiples of 128, so partial blocks are exercised
    cfg = make_config(hidden_size=144, intermediate_size=272, moe_intermediate_size=48, kv_lora_rank=48)
    model = _model(cfg)
    save_hf(model, tmp_path / "full")
    expected = _write_fp8_checkpoint(tmp_path / "full", tmp_path / "fp8")
    q, scale = quantize_fp8(model.model.layers[0].mlp.up_proj.weight.detach())
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (3, 2)
    loaded = load_hf(tmp_path / "fp8", dtype="float32")
    assert torch.equal(
        loaded.model.layers[0].mlp.up_proj.weight, expected["model.layers.0.mlp.up_proj.weight"]
    )
    assert torch.equal(
        loaded.model.layers[1].mlp.experts.down_proj[5],
        expected["model.layers.1.mlp.experts.5.down_proj.weight"],
    )
    # e4m3 keeps ~3 significant bits per value: the weights stay within a relative 1/16 of the originals
    w, w8 = (
        model.model.layers[2].self_attn.kv_b_proj.weight,
        loaded.model.layers[2].self_attn.kv_b_proj.weight,
    )
    assert ((w - w8).abs() <= w.abs() / 16 + 1e-3).all()
    ids = torch.randint(0, cfg.vocab_size, (1, 16))
    with torch.no_grad():
        assert torch.isfinite(loaded(ids)).all()
    # converting streams the same dequantized weights into a plain bf16 checkpoint
    cfg_out, n = convert_hf(tmp_path / "fp8", tmp_path / "bf16")
    converted = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert "quantization_config" not in converted and converted["torch_dtype"] == "bfloat16"
    assert n == len(expected)
    again = load_hf(tmp_path / "bf16", dtype="float32")
    assert torch.equal(
        again.model.layers[0].mlp.up_proj.weight,
        expected["model.layers.0.mlp.up_proj.weight"].bfloat16().float(),
    )


def test_both_rope_spellings_load(tmp_path, make_config):
    yarn = {
        "factor": 4.0,
        "original_max_position_embeddings": 64,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    }
    cfg = make_config(rope_scaling={"type": "yarn", **yarn}, rope_theta=50000.0)
    model = _model(cfg)
    save_hf(model, tmp_path / "published")  # writes rope_scaling, as DeepSeek's config.json
    published = json.loads((tmp_path / "published" / "config.json").read_text())
    assert published["rope_scaling"]["type"] == "yarn"
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "model.safetensors").write_bytes(
        (tmp_path / "published" / "model.safetensors").read_bytes()
    )
    t5 = {k: v for k, v in published.items() if k not in ("rope_scaling", "rope_theta")}
    t5["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 50000.0, **yarn}  # transformers 5
    (tmp_path / "t5" / "config.json").write_text(json.dumps(t5))
    assert read_hf_config(tmp_path / "t5").model_dump() == read_hf_config(tmp_path / "published").model_dump()
    ids = torch.randint(0, cfg.vocab_size, (1, 20))
    with torch.no_grad():
        assert torch.equal(load_hf(tmp_path / "t5")(ids), load_hf(tmp_path / "published")(ids))


@pytest.fixture
def checkpoint(tmp_path, make_config) -> Path:
    save_hf(_model(make_config(num_nextn_predict_layers=0)), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _rewrite(ckpt: Path, edit) -> None:
    tensors = _read_all(ckpt)
    edit(tensors)
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})


def _one_line_error(ckpt: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_hf(ckpt)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_tensor_is_named(checkpoint):
    _rewrite(checkpoint, lambda t: t.pop("model.layers.2.mlp.experts.3.up_proj.weight"))
    assert "missing tensor model.layers.2.mlp.experts.3.up_proj.weight" in _one_line_error(checkpoint)


def test_unexpected_tensor_is_named_with_its_file(checkpoint):
    _rewrite(checkpoint, lambda t: t.__setitem__("model.layers.0.self_attn.q_norm.weight", torch.ones(3)))
    message = _one_line_error(checkpoint)
    assert (
        "model.safetensors" in message
        and "unexpected tensor model.layers.0.self_attn.q_norm.weight" in message
    )


def test_misshaped_tensor_is_named_with_both_shapes(checkpoint):
    _rewrite(checkpoint, lambda t: t.__setitem__("model.norm.weight", torch.ones(63)))
    message = _one_line_error(checkpoint)
    assert "model.norm.weight has shape (63,), expected (64,)" in message and "model.safetensors" in message


def test_fp8_weight_without_scale_is_refused(checkpoint):
    def quantize_one(t):
        t["model.layers.0.mlp.up_proj.weight"] = quantize_fp8(t["model.layers.0.mlp.up_proj.weight"])[0]

    _rewrite(checkpoint, quantize_one)
    assert "has no model.layers.0.mlp.up_proj.weight_scale_inv" in _one_line_error(checkpoint)


def test_pickles_and_corrupt_files_are_refused(checkpoint):
    (checkpoint / "model.safetensors").write_bytes(b"not a safetensors file")
    assert "not a readable safetensors file" in _one_line_error(checkpoint)
    (checkpoint / "model.safetensors").unlink()
    (checkpoint / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    assert "pytorch_model.bin are pickles, which dsv3 never loads" in _one_line_error(checkpoint)


def test_save_never_clobbers_silently(checkpoint, make_config):
    model = _model(make_config(num_nextn_predict_layers=0), seed=9)
    with pytest.raises(CheckpointError, match="already exists"):
        save_hf(model, checkpoint)
    save_hf(model, checkpoint, overwrite=True)
    _assert_same_state(model, load_hf(checkpoint))
    assert not list(checkpoint.parent.glob(".*"))


def test_cli_convert_both_directions(checkpoint, tmp_path):
    (checkpoint / "tokenizer.json").write_text("{}")
    (checkpoint / "trainer").mkdir()  # what a training checkpoint adds; an export leaves it out
    (checkpoint / "trainer" / "state.json").write_text("{}")
    out = tmp_path / "exported"
    assert (
        main(
            [
                "convert",
                "--to-hf",
                str(checkpoint),
                "--to",
                str(out),
                "--dtype",
                "bfloat16",
                "--max-shard-size",
                "100KB",
            ]
        )
        == 0
    )
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.json").is_file()
    assert not (out / "trainer").exists()
    assert load_hf(out).lm_head.weight.dtype == torch.bfloat16
    back = tmp_path / "imported"
    assert main(["convert", "--from-hf", str(out), "--to", str(back), "--dtype", "float32"]) == 0
    _assert_same_state(load_hf(out, dtype="float32"), load_hf(back))
    assert main(["convert", "--from-hf", str(tmp_path / "nowhere"), "--to", str(tmp_path / "x")]) == 2
    assert main(["convert", "--from-hf", str(out), "--to", str(back)]) == 2  # exists, no --overwrite
