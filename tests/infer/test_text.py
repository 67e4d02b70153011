"""Samples during training and `dsv3 generate` use the run's tokenizer and the latent-cache decoder."""

from __future__ import annotations

import shutil

import pytest

from dsv3.cli import main
from dsv3.data.tokenizer import encode_texts, load_tokenizer, special_token_ids, train_tokenizer
from dsv3.infer.text import generate_from_checkpoint
from dsv3.train.trainer import train
from tests.conftest import FIXTURE_TEXT, micro_run, write_shard


@pytest.fixture
def tokenized_run(tmp_path):
    """A 12-step run on the fixture corpus through a BPE tokenizer trained on it."""
    paragraphs = [p for p in FIXTURE_TEXT.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    tok_path = train_tokenizer(paragraphs, vocab_size=256 + 5 + 40, out_dir=tmp_path / "tok")
    tok = load_tokenizer(tok_path)
    _, eos, _ = special_token_ids(tok)
    docs = [list(ids) + [eos] for ids in encode_texts(tok, paragraphs)]
    train_dir = write_shard(tmp_path / "shards" / "train" / "s0", docs[3:]).parent
    valid_dir = write_shard(tmp_path / "shards" / "valid" / "s0", docs[:3]).parent
    cfg = micro_run(tmp_path / "run", train_dir, valid_dir, f"model.vocab_size={tok.get_vocab_size()}",
                    f"data.tokenizer={tok_path}", "train.sample_prompt=The river", "train.sample_tokens=12")
    records = []
    result = train(cfg, on_record=records.append)
    return result, records, tok_path


def test_eval_samples_and_checkpoint_tokenizer(tokenized_run):
    result, records, _ = tokenized_run
    samples = [r["sample"] for r in records if r["kind"] == "eval"]
    assert len(samples) == 2 and all(s.startswith("The river") for s in samples)
    assert (result.last_checkpoint / "tokenizer.json").is_file()
    assert (result.last_checkpoint / "tokenizer_config.json").is_file()  # AutoTokenizer loads the dir


def test_generate_from_a_run_is_seeded(tokenized_run, capsys):
    result, _, _ = tokenized_run
    a = generate_from_checkpoint(result.output_dir, "The baker", max_new_tokens=16, seed=3)
    b = generate_from_checkpoint(result.last_checkpoint, "The baker", max_new_tokens=16, seed=3)
    assert a == b and len(a) > 0
    greedy = [
        generate_from_checkpoint(result.output_dir, "The baker", max_new_tokens=16, temperature=0, seed=s)
        for s in (0, 99)
    ]
    assert greedy[0] == greedy[1]
    assert main(["generate", "--checkpoint", str(result.output_dir), "--prompt", "The baker",
                 "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("The baker")


def test_generate_errors_are_one_line(tokenized_run, tmp_path, capsys):
    result, _, _ = tokenized_run
    bare = tmp_path / "bare"  # a model directory without a tokenizer or a run config naming one
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(result.last_checkpoint / name, bare / name)
    assert main(["generate", "--checkpoint", str(bare), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no tokenizer.json" in err and "--tokenizer" in err and "\n" not in err
    (result.last_checkpoint / "tokenizer.json").unlink()  # a checkpoint altered after its save
    assert main(["generate", "--checkpoint", str(result.last_checkpoint), "--prompt", "x"]) == 2
    assert "tokenizer.json: missing file listed in the manifest" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(tmp_path / "nowhere"), "--prompt", "x"]) == 2
    assert "neither a checkpoint" in capsys.readouterr().err
