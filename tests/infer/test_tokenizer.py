"""The serving tokenizer: chat templates as transformers renders them, prompts, incremental text."""

from __future__ import annotations

import json

import pytest
import transformers

from dsv3.config import ConfigError
from dsv3.data.tokenizer import BOS, EOS
from dsv3.infer.tokenizer import IncrementalDetokenizer, TextTokenizer

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "The river?"},
    {"role": "assistant", "content": "It flows."},
    {"role": "user", "content": "Where to?"},
]


def test_chat_template_renders_as_transformers_does(served_checkpoint):
    ours = TextTokenizer.load(served_checkpoint)
    theirs = transformers.AutoTokenizer.from_pretrained(served_checkpoint)
    for add in (True, False):
        text = ours.apply_chat_template(CHAT, add_generation_prompt=add)
        assert text == theirs.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=add)
        ids = theirs.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=add, return_dict=False)
        assert ours.encode_chat(CHAT, add) == list(ids)
    assert text.startswith(BOS) and ours.encode_chat(CHAT)[0] == ours.bos_id


def test_a_checkpoint_without_a_template_gets_deepseek_v3s(served_checkpoint, tmp_path):
    config = json.loads((served_checkpoint / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "tokenizer.json").write_bytes((served_checkpoint / "tokenizer.json").read_bytes())
    bare = TextTokenizer.load(tmp_path)
    expected = (
        "<｜begin▁of▁sentence｜>Be brief.<｜User｜>The river?<｜Assistant｜>It flows.<｜end▁of▁sentence｜>"
        "<｜User｜>Where to?<｜Assistant｜>"
    )
    assert bare.apply_chat_template(CHAT) == expected
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="tokenizer_config.json: not valid JSON"):
        TextTokenizer.load(tmp_path)


def test_prompts_start_a_document(served_checkpoint):
    tok = TextTokenizer.load(served_checkpoint)
    assert not tok.add_bos and tok.encode_prompt("The river") == [tok.eos_id, *tok.encode("The river")]
    with_bos = TextTokenizer(tok.tokenizer, {**tok.config, "add_bos_token": True})
    assert with_bos.encode_prompt("x")[0] == with_bos.bos_id
    assert tok.tokenizer.id_to_token(tok.eos_id) == EOS
    with pytest.raises(ValueError, match="messages: the chat template rejected them"):
        TextTokenizer(
            tok.tokenizer, {"chat_template": "{{ raise_exception('no system role') }}"}
        ).apply_chat_template(CHAT)


def test_incremental_text_equals_decoding_everything(served_checkpoint):
    """Fed one token at a time, the text emitted is the whole decode; a split character waits for its
    last byte instead of coming out as U+FFFD."""
    tok = TextTokenizer.load(served_checkpoint)
    text = "Ünïcödé rivers — 川 and 🌊 flow; the baker's 123456 loaves."
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add([t]) for t in ids]
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p == "") > 0  # multi-byte characters were held back
    assert detok.flush() == ""
    cut = IncrementalDetokenizer(tok)  # an output that ends inside a character
    partial = next(i for i in range(1, len(ids)) if tok.decode(ids[:i]).endswith("\ufffd"))
    held = "".join(cut.add([t]) for t in ids[:partial])
    assert held + cut.flush() == tok.decode(ids[:partial])  # the end is given as U+FFFD, not dropped
