"""`dsv3 generate --input prompts.jsonl --output out.jsonl`: one continuous batch, answers in order."""

from __future__ import annotations

import json

import pytest

from dsv3.cli import main
from dsv3.infer.llm import LLM
from dsv3.infer.sampling import SamplingParams

LINES = [
    {"id": "a", "prompt": "The river"},
    {"id": 7, "prompt": [5, 6, 7, 8]},
    {"messages": [{"role": "user", "content": "Where does the river go?"}], "max_tokens": 3},
    {"id": "sampled", "prompt": "The baker", "temperature": 1.0, "seed": 11, "n": 2, "logprobs": 1},
    {"id": "biased", "prompt": "The river", "logit_bias": {"65": 100}},
    {"id": "scored", "prompt": "The river", "prompt_logprobs": 2},
]


def _write(path, lines) -> str:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n\n")
    return str(path)


def test_a_prompt_file_is_answered_line_by_line(served_checkpoint, tmp_path, capsys):
    src, dst = _write(tmp_path / "prompts.jsonl", LINES), tmp_path / "out" / "answers.jsonl"
    argv = ["generate", "--checkpoint", str(served_checkpoint), "--input", src, "--output", str(dst),
            "--temperature", "0", "--max-new-tokens", "6", "--max-model-len", "64"]  # fmt: skip
    assert main(argv) == 0
    assert "6 prompts" in capsys.readouterr().out
    rows = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", 7, None, "sampled", "biased", "scored"]
    llm = LLM(served_checkpoint, max_model_len=64)
    tok = llm.engine.tokenizer
    greedy = SamplingParams(max_tokens=6, temperature=0)
    want = [
        llm.generate("The river", greedy)[0],
        llm.generate([5, 6, 7, 8], greedy)[0],
        llm.generate(tok.encode_chat(LINES[2]["messages"]), greedy.model_copy(update={"max_tokens": 3}))[0],
        llm.generate("The baker", SamplingParams(max_tokens=6, temperature=1.0, top_p=0.95, seed=11, n=2,
                                                 logprobs=1))[0],  # --top-p's default, the line's others
        llm.generate("The river", greedy.model_copy(update={"logit_bias": ((65, 100.0),)}))[0],
        llm.generate("The river", greedy.model_copy(update={"prompt_logprobs": 2}))[0],
    ]
    for row, out in zip(rows, want, strict=True):
        assert [o["text"] for o in row["outputs"]] == [c.text for c in out.outputs]
        assert [o["token_ids"] for o in row["outputs"]] == [c.token_ids for c in out.outputs]
        assert row["prompt_tokens"] == len(out.prompt_token_ids)
    assert len(rows[3]["outputs"]) == 2 and len(rows[3]["outputs"][0]["logprobs"]) == 6
    assert "logprobs" not in rows[0]["outputs"][0]
    assert rows[4]["outputs"][0]["token_ids"] == [65] * 6  # forced by its bias
    assert "prompt_logprobs" not in rows[0]
    assert rows[5]["prompt_logprobs"] == want[5].prompt_logprobs and rows[5]["prompt_logprobs"][0] is None
    assert rows[5]["prompt_ranks"] == want[5].prompt_ranks and rows[5]["prompt_ranks"][1] >= 1
    assert rows[5]["prompt_top_logprobs"] == [[list(t) for t in top] for top in want[5].prompt_top_logprobs]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([{"prompt": "x"}, '{"prompt": "y",'], "prompts.jsonl:2: not valid JSON"),
        ([{"prompt": "x", "temprature": 0.5}], "prompts.jsonl:1: temprature: Extra inputs are not permitted"),
        ([{"prompt": "x", "top_p": 2}], "prompts.jsonl:1: top_p: Input should be less than or equal to 1"),
        ([{"text": "x"}], "prompts.jsonl:1: needs exactly one of 'prompt' or 'messages'"),
        ([{"prompt": {"a": 1}}], "prompts.jsonl:1: 'prompt' must be text or a list of token ids"),
        ([["x"]], "prompts.jsonl:1: expected a JSON object"),
        ([{"prompt": "x"}, {"prompt": [5] * 100}], "prompts.jsonl:2: prompt: 100 tokens leave no room"),
        ([{"prompt": "x", "max_tokens": 200}], "prompts.jsonl:1: max_tokens: 200 with a prompt"),
        ([{"prompt": "x", "logit_bias": {"5": 300}}], "prompts.jsonl:1: logit_bias: Value error, bias 300.0"),
        ([{"prompt": "x", "logit_bias": {"100000": 1}}], "prompts.jsonl:1: logit_bias: token ids must be"),
    ],
)
def test_a_bad_prompt_file_is_one_line_naming_the_line(served_checkpoint, tmp_path, capsys, lines, message):
    src, dst = _write(tmp_path / "prompts.jsonl", lines), tmp_path / "out.jsonl"
    argv = ["generate", "--checkpoint", str(served_checkpoint), "--input", src, "--output", str(dst),
            "--max-model-len", "96"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not dst.exists()


def test_flags_that_do_not_go_together(served_checkpoint, tmp_path, capsys):
    ck = str(served_checkpoint)
    assert main(["generate", "--checkpoint", ck, "--input", str(tmp_path / "p.jsonl")]) == 2
    assert "--input needs --output" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", ck, "--prompt", "x", "--output", str(tmp_path / "o")]) == 2
    assert "--output goes with --input" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", ck, "--prompt", "x", "--max-num-seqs", "0"]) == 2
    assert "--max-num-seqs: Input should be greater than or equal to 1" in capsys.readouterr().err
    empty = _write(tmp_path / "empty.jsonl", [])
    assert main(["generate", "--checkpoint", ck, "--input", empty, "--output", str(tmp_path / "o")]) == 2
    assert "no prompts" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"])
    assert info.value.code == 0 and "/v1/chat/completions" in capsys.readouterr().out
