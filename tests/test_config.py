"""Typed configs: one-line errors naming file and key, override precedence, HF config.json spellings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dsv3.config import (
    PRESETS_DIR,
    ConfigError,
    ModelConfig,
    TrainConfig,
    load_model_config,
    load_run_config,
    preset_names,
)

# deepseek-ai/DeepSeek-V3's config.json as published (written by transformers 4.33).
PUBLISHED_DSV3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekV3Config",
        "AutoModel": "modeling_deepseek.DeepseekV3Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
    },
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096, "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}


def _math(cfg: ModelConfig) -> dict:
    return cfg.model_dump(exclude={"hf_extras"})


def _write_run(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _error(ref, overrides=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_run_config(ref, overrides)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# --- errors: one line naming the file and the key --------------------------------------------


def test_unknown_key_names_file_and_key(tmp_path):
    path = _write_run(tmp_path, "model: tiny\ntrain:\n  stepz: 10\n")
    message = _error(path)
    assert str(path) in message and "train.stepz" in message and "unknown key" in message


def test_wrong_type_names_key_and_value(tmp_path):
    path = _write_run(tmp_path, "model: tiny\ntrain:\n  steps: lots\n")
    message = _error(path)
    assert str(path) in message and "train.steps" in message and "'lots'" in message


def test_broken_yaml_names_file_line_and_column(tmp_path):
    path = _write_run(tmp_path, "model: tiny\ntrain:\n  steps: [1, 2\n  lr: 3\n")
    message = _error(path)
    assert message.startswith(f"{path}:") and "invalid YAML" in message
    line = int(message[len(str(path)) + 1:].split(":")[0])
    assert 3 <= line <= 5


def test_missing_file_and_unknown_preset(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert str(missing) in _error(missing)
    message = _error("no-such-preset")
    assert "no-such-preset" in message and "tiny" in message  # lists the presets there are


def test_missing_model_file_referenced_from_run(tmp_path):
    path = _write_run(tmp_path, "model: ./absent.yaml\n")
    assert "absent.yaml" in _error(path)


def test_model_consistency_error_is_one_line(tmp_path):
    path = _write_run(tmp_path, "model: tiny\n")
    message = _error(path, ["model.num_experts_per_tok=100"])
    assert "num_experts_per_tok" in message


def test_top_level_must_be_a_mapping(tmp_path):
    path = _write_run(tmp_path, "- a\n- b\n")
    assert "expected a mapping" in _error(path)


# --- overrides ------------------------------------------------------------------------------


def test_set_overrides_file_and_last_one_wins(tmp_path):
    path = _write_run(tmp_path, "model: tiny\ntrain:\n  lr: 0.01\n  steps: 5\n")
    assert load_run_config(path).train.lr == 0.01
    run = load_run_config(path, ["train.lr=0.02", "train.lr=0.03"])
    assert run.train.lr == 0.03 and run.train.steps == 5  # untouched keys keep the file's value


def test_set_reaches_into_a_preset_model_and_creates_sections(tmp_path):
    path = _write_run(tmp_path, "model: tiny\n")  # no data: or parallel: section in the file
    run = load_run_config(path, [
        "model.hidden_size=512",
        "data.train=[a, b]",
        "model.rope_scaling.factor=4",
        "model.rope_scaling.original_max_position_embeddings=512",
    ])
    assert run.model.hidden_size == 512 and run.model.vocab_size == 8192  # the rest from the tiny preset
    assert run.data.train == ["a", "b"]
    assert run.model.rope_scaling is not None and run.model.rope_scaling.factor == 4


def test_balance_defaults_are_the_papers_alpha_and_the_auto_bias_speed():
    train = load_run_config("tiny").train
    assert train.balance_alpha == 1e-4 and train.bias_update_speed == "auto"
    speed = load_run_config("tiny", ["train.bias_update_speed=1e-3"]).train.bias_update_speed  # YAML: a str
    assert speed == 1e-3


def test_set_value_types_follow_yaml():
    run = load_run_config("tiny", ["train.compile=true", "model.q_lora_rank=null", "train.lr=1e-3"])
    assert run.train.compile is True and run.model.q_lora_rank is None and run.train.lr == pytest.approx(1e-3)


@pytest.mark.parametrize(("item", "expected"), [
    ("train.lrr=1", "train.lrr: unknown key"),
    ("train", "expected key.path=value"),
    ("train..lr=1", "expected key.path=value"),
    ("train.lr.x=1", "lr is not a section"),
    ("train.steps=-3", "train.steps"),
    ("train.bias_update_speed=fast", "train.bias_update_speed: expected auto or a number >= 0 (got 'fast')"),
    ("train.bias_update_speed=-0.1", "train.bias_update_speed: expected auto or a number >= 0 (got -0.1)"),
    ("train.bias_update_speed=.inf", "train.bias_update_speed: expected auto or a number >= 0"),
])
def test_bad_set_is_one_line_error(item, expected):
    assert expected in _error("tiny", [item])


# --- presets and Hugging Face config.json -----------------------------------------------------


def test_every_preset_loads():
    names = preset_names()
    assert {"tiny", "small", "1b", "5b", "10b", "15b", "20b", "deepseek-v3"} <= set(names)
    for name in names:
        assert load_run_config(name).name == name


def test_published_deepseek_v3_config_json_loads_as_the_preset(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(PUBLISHED_DSV3))
    cfg = load_model_config(path)
    assert _math(cfg) == _math(load_model_config("deepseek-v3"))
    assert cfg.hf_extras["quantization_config"]["quant_method"] == "fp8"  # kept, not lost
    assert load_model_config(tmp_path) == cfg  # a checkpoint directory works too


def test_transformers_5_config_json_round_trips(tmp_path):
    import transformers
    for preset in ("tiny", "deepseek-v3"):
        ours = load_model_config(preset)
        written = json.loads(transformers.DeepseekV3Config(**ours.to_hf_dict()).to_json_string())
        assert "rope_parameters" in written  # transformers 5's spelling of rope_theta + rope_scaling
        path = tmp_path / f"{preset}.json"
        path.write_text(json.dumps(written))
        assert _math(load_model_config(path)) == _math(ours)


def test_rope_parameters_default_keeps_theta_and_rejects_unknown_type():
    data = {**PUBLISHED_DSV3, "rope_parameters": {"rope_type": "default", "rope_theta": 50000.0}}
    del data["rope_scaling"], data["rope_theta"]
    cfg = ModelConfig.model_validate(data)
    assert cfg.rope_theta == 50000.0 and cfg.rope_scaling is None
    data["rope_parameters"] = {"rope_type": "linear", "factor": 2.0}
    with pytest.raises(ValueError, match="rope_type"):
        ModelConfig.model_validate(data)


def test_hf_keys_that_change_the_math_are_checked(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**PUBLISHED_DSV3, "scoring_func": "softmax"}))
    with pytest.raises(ConfigError, match="scoring_func"):
        load_model_config(path)


def test_run_config_model_may_name_a_model_file(tmp_path):
    # `model:` may name a model-only YAML (relative to the run file), and `base:` edits a named model.
    model = yaml.safe_load((Path(__file__).parents[1] / "configs" / "small.yaml").read_text())["model"]
    (tmp_path / "model.yaml").write_text(yaml.safe_dump({**model, "vocab_size": 4096}))
    (tmp_path / "run.yaml").write_text("name: r\nmodel: model.yaml\n")
    (tmp_path / "based.yaml").write_text("name: b\nmodel: {base: model.yaml, num_hidden_layers: 3}\n")
    run, based = load_run_config(tmp_path / "run.yaml"), load_run_config(tmp_path / "based.yaml")
    assert run.model.vocab_size == 4096 and run.model.hidden_size == model["hidden_size"] == 1024
    assert based.model.num_hidden_layers == 3 and based.model.vocab_size == 4096


def test_a_key_a_set_broke_is_blamed_on_that_set():
    message = _error("tiny", ["train.steps=-3", "train.lr=0.01"])
    assert message.startswith("--set train.steps=-3 on ") and "tiny.yaml: train.steps" in message
    assert "--set train.lr" not in message  # a valid override is not named


def test_every_preset_ships_as_package_data():
    # A plain `pip install .` copies only what pyproject's package-data names: every YAML under the
    # presets folder must match one of its patterns, or `dsv3 plan --config X` fails after install.
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["dsv3"]
    package = PRESETS_DIR.parent
    shipped = {p for pattern in patterns for p in package.glob(pattern)}
    assert set(PRESETS_DIR.rglob("*.yaml")) == shipped and len(shipped) >= 10
    assert (Path(__file__).parents[1] / "configs").resolve() == PRESETS_DIR  # the checkout's link


def test_chunked_loss_with_a_pipeline_is_refused():
    message = _error("tiny", ["train.loss_chunk_tokens=4096", "parallel.gpus=2", "parallel.pp=2"])
    assert "loss_chunk_tokens" in message and "pp" in message
    assert load_run_config("tiny", ["train.loss_chunk_tokens=4096"]).train.loss_chunk_tokens == 4096


@pytest.mark.parametrize(
    "param_dtype, dtype, device, processes, bf16",
    [
        ("auto", "auto", "cuda", 1, True),  # one GPU: bf16 weights, float32 masters
        ("auto", "auto", "cpu", 1, False),  # a CPU computes in float32
        ("auto", "auto", "cuda", 2, False),  # FSDP: float32 shards, bf16 compute by its policy
        ("auto", "float32", "cuda", 1, False),
        ("auto", "bfloat16", "cpu", 1, True),
        ("float32", "auto", "cuda", 1, False),
        ("bfloat16", "auto", "cpu", 1, True),
    ],
)
def test_param_dtype_auto_keeps_bf16_weights_where_one_process_computes_in_bf16(
    param_dtype, dtype, device, processes, bf16
):
    train = TrainConfig(param_dtype=param_dtype, dtype=dtype)
    assert train.bf16_weights(device, processes) is bf16
