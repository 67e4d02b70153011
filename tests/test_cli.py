"""The foundation commands end to end: help with examples, exit codes, one-line errors, JSON output."""

from __future__ import annotations

import json
import shlex

import pytest

from dsv3.cli import COMMANDS, build_parser, main
from dsv3.config import load_model_config
from dsv3.scaling import count_params

FOUNDATION = ("plan", "select-config", "validate-chinchilla")


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _tiny_run(tmp_path, steps: int, name: str) -> str:
    """A run on the tiny model; its tokens per active parameter are set by `steps`."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"name: {name}\nmodel: tiny\n"
        f"train:\n  steps: {steps}\n  global_batch_size: 32\n  micro_batch_size: 32\n  seq_len: 256\n"
    )
    return str(path)


def _steps_for(ratio: float) -> int:
    return round(ratio * count_params(load_model_config("tiny")).active / (32 * 256))


# --- help and examples -----------------------------------------------------------------------


def test_every_foundation_command_has_help_with_a_working_example(capsys):
    registered = {name: cmd.example for name, cmd in COMMANDS.items()}
    for name in FOUNDATION:
        with pytest.raises(SystemExit) as info:
            build_parser().parse_args([name, "--help"])
        assert info.value.code == 0
        assert f"example:\n  {registered[name]}" in capsys.readouterr().out
        argv = shlex.split(registered[name])
        assert argv[0] == "dsv3" and argv[1] == name
        assert main(argv[1:]) == 0, registered[name]  # the example is a real invocation
        capsys.readouterr()


def test_top_level_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for name in FOUNDATION:
        assert name in out


# --- config errors reach the user as one red line and exit code 2 ------------------------------


@pytest.mark.parametrize(("text", "needle"), [
    ("model: tiny\ntrain:\n  stepz: 3\n", "train.stepz: unknown key"),
    ("model: tiny\ntrain:\n  steps: many\n", "train.steps"),
    ("model: tiny\ntrain: [1, 2\n", "invalid YAML"),
])
def test_config_errors_exit_2_with_one_line(tmp_path, capsys, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    for command in (["plan", "--config", str(path)], ["validate-chinchilla", "--config", str(path)]):
        code, out, err = _run(capsys, *command)
        assert code == 2 and out == ""
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:")
        assert str(path) in lines[0] and needle in lines[0]


def test_missing_config_and_bad_set(capsys):
    code, _, err = _run(capsys, "plan", "--config", "/no/such/file.yaml")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "/no/such/file.yaml: no such config file" in err
    code, _, err = _run(capsys, "plan", "--config", "tiny", "--set", "train.lrr=1")
    assert code == 2 and "train.lrr: unknown key" in err
    code, _, err = _run(capsys, "plan")
    assert code == 2 and "--config" in err


# --- plan ------------------------------------------------------------------------------------


def test_plan_json_is_one_object_with_exact_counts(capsys):
    code, out, _ = _run(capsys, "plan", "--config", "small", "--json")
    assert code == 0
    plan = json.loads(out)
    assert plan["params"]["total"] == 1_239_253_504 and plan["params"]["active"] == 202_211_840
    assert plan["flops_per_token"]["seq_len"] == 2048 and plan["chinchilla"]["verdict"] == "compliant"
    assert plan["memory_per_gpu"]["fits"] is True


def test_plan_set_overrides_apply_and_several_configs_nest(capsys):
    code, out, _ = _run(capsys, "plan", "--config", "tiny", "--config", "small", "--set", "train.seq_len=512",
                        "--json")
    assert code == 0
    plans = json.loads(out)["plans"]
    assert [p["name"] for p in plans] == ["tiny", "small"]
    assert all(p["flops_per_token"]["seq_len"] == 512 for p in plans)


def test_plan_tables_name_every_section(capsys):
    code, out, _ = _run(capsys, "plan", "--config", "tiny")
    assert code == 0
    for title in ("Parameters", "Training FLOPs per token", "KV cache", "Memory per GPU", "Chinchilla"):
        assert title in out


# --- validate-chinchilla ---------------------------------------------------------------------


def test_validate_chinchilla_exit_codes(tmp_path, capsys):
    good = _tiny_run(tmp_path, _steps_for(22), "good")
    short = _tiny_run(tmp_path, _steps_for(5), "short")
    long = _tiny_run(tmp_path, _steps_for(40), "long")

    code, out, _ = _run(capsys, "validate-chinchilla", "--config", good, "--strict")
    assert code == 0 and "compliant" in out
    code, out, _ = _run(capsys, "validate-chinchilla", "--config", short)
    assert code == 0 and "under-trained" in out  # reported, but only --strict fails
    code, out, _ = _run(capsys, "validate-chinchilla", "--config", good, "--config", short, "--strict")
    assert code == 1 and "not compliant" in out and short in out
    code, out, _ = _run(capsys, "validate-chinchilla", "--config", long, "--strict")
    assert code == 1 and "over-trained" in out
    code, _, _ = _run(capsys, "validate-chinchilla", "--config", long, "--ratio-max", "45", "--strict")
    assert code == 0  # the range is the user's to set


def test_validate_chinchilla_defaults_to_every_preset(capsys):
    code, out, _ = _run(capsys, "validate-chinchilla", "--strict")
    assert code == 0
    for name in ("tiny", "small", "1b", "5b", "10b", "15b", "20b", "deepseek-v3"):
        assert name in out


def test_validate_chinchilla_rejects_inverted_range(capsys):
    code, _, err = _run(capsys, "validate-chinchilla", "--ratio-min", "30", "--ratio-max", "20")
    assert code == 2 and "--ratio-min 30" in err


# --- select-config ---------------------------------------------------------------------------


def test_select_config_json_ranks_and_explains(capsys):
    code, out, _ = _run(capsys, "select-config", "--gpus", "8", "--gpu-memory", "80", "--hours", "24",
                        "--json")
    assert code == 0
    choices = json.loads(out)["choices"]
    assert choices[0]["fits"] and choices[0]["parallel"]["gpus"] == 8 and choices[0]["hours"] <= 24
    rejected = {c["name"]: c["reason"] for c in choices if not c["fits"]}
    assert "GiB per GPU" in rejected["deepseek-v3"] and "24 h budget" in rejected["20b"]


def test_select_config_judges_extra_configs_and_prints_reasons(tmp_path, capsys):
    extra = _tiny_run(tmp_path, _steps_for(21), "my-tiny")
    code, out, _ = _run(capsys, "select-config", "--gpus", "1", "--gpu-memory", "24", "--config", extra)
    assert code == 0
    assert "my-tiny" in out and "Largest that fits: 1b" in out and "5b does not fit" in out


def test_select_config_set_applies_to_the_named_preset_once(capsys):
    code, out, _ = _run(capsys, "select-config", "--gpus", "1", "--gpu-memory", "40", "--config", "small",
                        "--set", "train.micro_batch_size=1", "--set", "train.global_batch_size=8", "--json")
    choices = [c for c in json.loads(out)["choices"] if c["name"] == "small"]
    assert code == 0 and len(choices) == 1 and choices[0]["micro_batch_size"] == 1


def test_select_config_nothing_fits_exits_1(capsys):
    code, out, _ = _run(capsys, "select-config", "--gpus", "1", "--gpu-memory", "0.01")
    assert code == 1 and "No config fits" in out


def test_select_config_bad_flags_exit_2(capsys):
    code, _, err = _run(capsys, "select-config", "--gpus", "8", "--gpu-memory", "80", "--mfu", "1.5")
    assert code == 2 and "--mfu" in err
