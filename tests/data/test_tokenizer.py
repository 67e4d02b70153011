"""Tokenizer: trains on real text, loads in transformers with its special tokens, round-trips."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import transformers
import zstandard

from dsv3.config import ConfigError
from dsv3.data.corpus import iter_stdlib_documents
from dsv3.data.tokenizer import (
    ASSISTANT,
    BOS,
    EOS,
    PAD,
    USER,
    encode_texts,
    load_tokenizer,
    special_token_ids,
    train_tokenizer,
    train_tokenizer_from_files,
)

SAMPLES = [
    "def f(x):\n    return x ** 2  # square\n",
    "Café crème, naïve façade — 東京 🚀\ttabs\r\nand  spaces  ",
    "Version 3.11.7 was released on 2023-12-04; 1234567 bytes.",
    "",
]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [d["text"] for d in iter_stdlib_documents("all", limit=600)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, texts):
    out = tmp_path_factory.mktemp("tok")
    path = train_tokenizer(texts, vocab_size=800, out_dir=out)
    return out, path


def test_writes_the_files_transformers_needs(trained):
    out, path = trained
    assert path == out / "tokenizer.json"
    assert sorted(p.name for p in out.iterdir()) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    assert json.loads((out / "special_tokens_map.json").read_text())["eos_token"] == EOS


def test_pretrained_tokenizer_fast_knows_special_tokens_and_round_trips(trained):
    out, path = trained
    ours = load_tokenizer(out)
    bos, eos, pad = special_token_ids(ours)
    assert (bos, eos, pad) == (0, 1, 2)
    assert ours.get_vocab_size() == 800

    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(out))
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == (BOS, EOS, PAD)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (bos, eos, pad)
    assert set(hf.all_special_tokens) == {BOS, EOS, PAD, USER, ASSISTANT}
    auto = transformers.AutoTokenizer.from_pretrained(str(out))
    plain = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token=BOS, eos_token=EOS,
                                                 pad_token=PAD)
    assert plain.convert_tokens_to_ids([BOS, EOS, PAD]) == [bos, eos, pad] and plain.eos_token_id == eos
    for text in SAMPLES:
        ids = hf.encode(text, add_special_tokens=False)
        assert ids == ours.encode(text, add_special_tokens=False).ids
        assert ids == auto.encode(text, add_special_tokens=False)
        assert hf.decode(ids) == text == plain.decode(plain.encode(text, add_special_tokens=False))
    # Special tokens are atomic: each is one id and never split, also inside text.
    marked = f"{BOS}{USER}hi{ASSISTANT}hello{EOS}"
    ids = hf.encode(marked, add_special_tokens=False)
    assert ids[:2] == [bos, hf.convert_tokens_to_ids(USER)] and ids[-1] == eos
    assert hf.decode(ids) == marked and hf.decode(ids, skip_special_tokens=True) == "hihello"


def test_chat_template_uses_deepseek_markers(trained):
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(trained[0]))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"}]
    rendered = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == f"{BOS}Be brief.{USER}2+2?{ASSISTANT}4{EOS}{USER}3+3?{ASSISTANT}"


def test_digits_are_split_into_groups_of_three(trained):
    tok = load_tokenizer(trained[0])
    pieces = [tok.decode([i]) for i in tok.encode("x = 1234567", add_special_tokens=False).ids]
    digits = [p.strip() for p in pieces if p.strip().isdigit()]
    assert "".join(digits) == "1234567" and max(map(len, digits)) <= 3


def test_encode_texts_matches_single_encodes(trained):
    tok = load_tokenizer(trained[0])
    arrays = encode_texts(tok, SAMPLES)
    assert all(a.dtype == np.uint32 for a in arrays)
    assert [a.tolist() for a in arrays] == [tok.encode(t, add_special_tokens=False).ids for t in SAMPLES]


def test_bad_inputs_are_one_line_errors(tmp_path, trained):
    with pytest.raises(ConfigError, match="vocab_size 100 < 256 bytes"):
        train_tokenizer(["a"], vocab_size=100, out_dir=tmp_path / "x")
    with pytest.raises(ConfigError, match="no tokenizer file"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a valid tokenizer.json") as err:
        load_tokenizer(tmp_path / "bad.json")
    assert "\n" not in str(err.value)
    from tokenizers import Tokenizer, models

    with pytest.raises(ConfigError, match="no special token"):
        special_token_ids(Tokenizer(models.BPE()))


def _inputs(tmp_path, texts):
    records = [json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)]
    (tmp_path / "a.jsonl").write_text("\n".join(records[:100] + ["{broken", '{"id": 7}']) + "\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write("\n".join(records[100:200]) + "\n")
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.compress(("\n".join(records[200:300]) + "\n").encode()))
    pq.write_table(pa.table({"text": texts[300:400]}), tmp_path / "d.parquet")
    return [tmp_path / n for n in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.parquet")]


def test_train_from_files_reads_every_format_and_reports_bad_records(tmp_path, texts):
    paths = _inputs(tmp_path, texts)
    seen: list[int] = []
    count = lambda: seen.append(0)  # noqa: E731
    out, used, skipped, examples = train_tokenizer_from_files(paths, 600, tmp_path / "t", on_document=count)
    assert used == 400 == len(seen)
    assert skipped == 2 and examples[0].startswith(f"{paths[0]}:101: bad_json: ")
    assert examples[1].startswith(f"{paths[0]}:102: missing_text: no field 'text'")
    assert load_tokenizer(out).get_vocab_size() == 600
    _, used, _, _ = train_tokenizer_from_files([tmp_path], 600, tmp_path / "tok2", limit=50)  # a folder
    assert used == 50


def test_train_from_files_fails_cleanly_without_documents(tmp_path):
    (tmp_path / "e.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(ConfigError, match="no document with a string 'text' field"):
        train_tokenizer_from_files([tmp_path / "e.jsonl"], 600, tmp_path / "tok")
    assert not (tmp_path / "tok").exists()
    with pytest.raises(ConfigError, match="no such file"):
        train_tokenizer_from_files([tmp_path / "missing.jsonl"], 600, tmp_path / "tok")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "f.parquet")
    with pytest.raises(ConfigError, match="1 records skipped, e.g. .*f.parquet.*no field 'text'"):
        train_tokenizer_from_files([tmp_path / "f.parquet"], 600, tmp_path / "tok")


def test_truncated_compressed_input_keeps_what_was_readable(tmp_path, texts):
    _inputs(tmp_path, texts)
    data = (tmp_path / "b.jsonl.gz").read_bytes()
    (tmp_path / "t.jsonl.gz").write_bytes(data[: len(data) // 2])
    _, used, skipped, examples = train_tokenizer_from_files([tmp_path / "t.jsonl.gz"], 600, tmp_path / "tok")
    assert 0 < used < 100
    assert skipped == 1 and f"t.jsonl.gz:{used + 1}: truncated: file ends early" in examples[0]


def test_cli_trains_a_tokenizer(tmp_path, texts):
    from dsv3.cli import main

    paths = _inputs(tmp_path, texts)
    assert main(["tokenizer", "train", "--input", str(paths[0]), str(paths[3]), "--vocab-size", "600",
                 "--output", str(tmp_path / "tok")]) == 0
    assert special_token_ids(load_tokenizer(tmp_path / "tok")) == (0, 1, 2)
    assert main(["tokenizer", "train", "--input", str(paths[0]), "--vocab-size", "10",
                 "--output", str(tmp_path / "tok3")]) == 2
