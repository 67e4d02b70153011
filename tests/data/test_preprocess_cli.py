"""`dsv3 preprocess`: flags override the YAML, the summary is printed, bad configs are one red line,
and configs/data/demo.yaml is a valid pipeline."""

from __future__ import annotations

import json
from pathlib import Path

from dsv3.cli import main
from dsv3.data.pipeline_config import load_pipeline_config

REPO = Path(__file__).resolve().parents[2]
TEXT = ("The library keeps its oldest books in a cool room behind the reading hall. Readers may ask for "
        "them at the desk, and a librarian brings them out one at a time on a grey cushion. {i}")


def test_preprocess_runs_with_flag_overrides_and_prints_the_summary(tmp_path, capsys):
    docs = [{"id": f"d{i}", "text": TEXT.format(i=i)} for i in range(20)]
    docs += [{"id": "short", "text": "Too short."}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs) + "{broken\n")
    (tmp_path / "p.yaml").write_text(
        "inputs: [{path: nowhere.jsonl}]\noutput: nowhere\nsteps:\n  - gopher_quality: {min_words: 20}\n"
        "dedup: {}\n")
    code = main(["preprocess", "--config", str(tmp_path / "p.yaml"), "--input", str(tmp_path / "in.jsonl"),
                 "--output", str(tmp_path / "out"), "--workers", "2", "--set", "dedup.minhash.threshold=0.8"])
    out = capsys.readouterr().out
    assert code == 0
    assert "01_gopher_quality" in out and "too_few_words 1" in out and "bad_json 1" in out
    assert "kept 1 documents" in out  # 20 near-identical texts: one survives dedup
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["dedup"]["near_removed"] + report["dedup"]["exact_removed"] == 19


def test_bad_config_is_one_red_line_and_exit_2(tmp_path, capsys):
    yaml = "inputs: [{path: x.jsonl}]\noutput: o\nsteps: [{c4_quality: {curly: 1}}]\n"
    (tmp_path / "p.yaml").write_text(yaml)
    assert main(["preprocess", "--config", str(tmp_path / "p.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "p.yaml: steps[0].c4_quality: curly: unknown key" in err
    assert main(["preprocess", "--config", str(tmp_path / "p.yaml"), "--workers", "0"]) == 2


def test_demo_pipeline_config_is_valid():
    cfg = load_pipeline_config(REPO / "configs" / "data" / "demo.yaml")
    assert cfg.tokenize is not None and cfg.tokenize.train.vocab_size == 8192
    assert cfg.dedup is not None and cfg.steps
