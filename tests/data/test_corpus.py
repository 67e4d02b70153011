"""The standard-library corpus: code units tile each file, prose comes from docstrings, comments
and the reference topics, ids are unique and the order is deterministic."""

from __future__ import annotations

import json
import textwrap

import pytest
import zstandard

from dsv3.cli import main
from dsv3.data.corpus import iter_stdlib_documents, write_jsonl_zst

MODULE = '''\
"""Module docstring: what this module is for."""

import os

# A comment block that explains the constant below
# in more than six words of prose.
LIMIT = 3  # a trailing comment, not prose


def short(x):
    """Return x twice."""
    return x * 2


@decorator
def long_one(a):
    s = "# not a comment, it is inside a string and stays code"
{body}
    return a


class Outer(Base):
    """Outer docstring."""

    size = 1

    def method(self):
        return self.size

    class Inner:
        def deep(self):
            pass
'''


@pytest.fixture()
def fake_stdlib(tmp_path):
    body = "\n".join(f"    a = a + {i}" for i in range(30))
    (tmp_path / "mod.py").write_text(MODULE.format(body=body))
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("# ok\n")
    (tmp_path / "pkg" / "broken.py").write_text("def (:\n")
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "third.py").write_text("x = 1\n")
    (tmp_path / "pydoc_data").mkdir()
    topics = {"zeta": "The zeta statement\n******************\n\nIt does z.\n\nSub part\n========\n\nMore z.",
              "alpha": "Alpha\n*****\n\nText."}
    (tmp_path / "pydoc_data" / "topics.py").write_text(f"topics = {topics!r}\n")
    return tmp_path


def test_code_units_tile_each_file(fake_stdlib):
    docs = list(iter_stdlib_documents("code", root=fake_stdlib, max_lines=12))
    mod = [d for d in docs if d["meta"]["path"] == "mod.py"]
    lines = (fake_stdlib / "mod.py").read_text().splitlines()
    covered = [n for d in mod for n in range(d["meta"]["lines"][0], d["meta"]["lines"][1] + 1)]
    assert covered == list(range(1, len(lines) + 1))  # every line once, in order
    for d in mod:
        first, last = d["meta"]["lines"]
        assert d["text"] == textwrap.dedent("\n".join(lines[first - 1 : last]) + "\n").strip("\n")
        assert d["id"] == f"mod.py:{first}" and d["meta"]["kind"] == "code"
    units = [(d["meta"]["unit"], d["meta"]["name"]) for d in mod]
    assert units[0] == ("module", "<module>") and "Module docstring" in mod[0]["text"]
    assert ("function", "short") in units and ("method", "Outer.method") in units
    assert ("method", "Outer.Inner.deep") in units and ("class", "Outer") in units
    pieces = [d for d in mod if d["meta"]["name"] == "long_one"]
    assert len(pieces) == 3 and pieces[0]["text"].startswith("@decorator\ndef long_one(a):")
    assert all(d["meta"]["lines"][1] - d["meta"]["lines"][0] < 12 for d in pieces)
    paths = {d["meta"]["path"] for d in docs}
    assert paths == {"mod.py", "pkg/__init__.py"}  # broken, site-packages and topics data excluded


def test_prose_from_docstrings_comments_and_topics(fake_stdlib):
    docs = list(iter_stdlib_documents("prose", root=fake_stdlib))
    by_id = {d["id"]: d for d in docs}
    assert by_id["mod.py:1:docstring"]["text"] == "Module docstring: what this module is for."
    assert by_id["mod.py:5:comment"]["text"] == (
        "A comment block that explains the constant below\nin more than six words of prose.")
    documented = {d["meta"]["name"] for d in docs if d["meta"]["unit"] == "docstring"}
    assert documented == {"<module>", "short", "Outer"}
    assert not any("not a comment" in d["text"] or "trailing" in d["text"] for d in docs)
    topics = [d for d in docs if d["meta"]["unit"] == "topic"]
    assert [d["id"] for d in topics] == ["pydoc_data/topics.py:alpha:0", "pydoc_data/topics.py:zeta:0",
                                         "pydoc_data/topics.py:zeta:1"]
    assert topics[2]["text"] == "Sub part\n========\n\nMore z."
    assert all(d["meta"]["kind"] == "prose" for d in docs)


def test_order_ids_limit_and_kind(fake_stdlib):
    everything = list(iter_stdlib_documents("all", root=fake_stdlib))
    assert everything == list(iter_stdlib_documents("all", root=fake_stdlib))
    assert len({d["id"] for d in everything}) == len(everything)
    assert list(iter_stdlib_documents("all", limit=4, root=fake_stdlib)) == everything[:4]
    kinds = {d["meta"]["kind"] for d in everything}
    assert kinds == {"code", "prose"}
    with pytest.raises(ValueError, match="kind must be"):
        iter_stdlib_documents("poetry", root=fake_stdlib)
    with pytest.raises(FileNotFoundError, match="standard library directory not found"):
        iter_stdlib_documents(root=fake_stdlib / "nowhere")


def test_real_stdlib_documents_look_right():
    docs = list(iter_stdlib_documents("all", limit=3000))
    assert len(docs) == 3000 and len({d["id"] for d in docs}) == 3000
    assert {d["meta"]["kind"] for d in docs} == {"code", "prose"}
    assert all(d["text"].strip() for d in docs)
    assert not any("site-packages" in d["meta"]["path"] for d in docs)


@pytest.mark.slow
def test_real_stdlib_has_over_100k_documents():
    assert sum(1 for _ in iter_stdlib_documents("all")) >= 100_000


def _read(path):
    with zstandard.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_write_jsonl_zst_is_atomic(tmp_path):
    docs = [{"id": "a", "text": "héllo\n", "meta": {"k": 1}}, {"id": "b", "text": "", "meta": {}}]
    assert write_jsonl_zst(docs, tmp_path / "out.jsonl.zst") == 2
    assert _read(tmp_path / "out.jsonl.zst") == docs

    def failing():
        yield docs[0]
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_jsonl_zst(failing(), tmp_path / "out.jsonl.zst")
    assert _read(tmp_path / "out.jsonl.zst") == docs  # the old file survives a failed write
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl.zst"]


def test_cli_writes_the_corpus(tmp_path):
    out = tmp_path / "c.jsonl.zst"
    assert main(["corpus", "stdlib", "--output", str(out), "--kind", "prose", "--limit", "25"]) == 0
    docs = _read(out)
    assert len(docs) == 25 and all(d["meta"]["kind"] == "prose" for d in docs)
    assert main(["corpus", "stdlib", "--output", str(out), "--limit", "0"]) == 2
