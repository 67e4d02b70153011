"""Readers: every format yields the same documents (ids, text, meta), parts cover each record once,
and corrupt records are counted, recorded with file and line, and skipped without stopping."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
import zstandard

from dsv3.config import ConfigError
from dsv3.data.document import Rejects, StepStats
from dsv3.data.readers import InputConfig, iter_documents, plan_parts, read_part
from dsv3.data.writers import JsonlZstWriter, ParquetWriter

RECORDS = [
    {"id": f"doc-{i}", "text": f"text number {i}", "lang": "en", "meta": {"source": "s", "n": i}}
    for i in range(25)
]


def _read_all(cfg: InputConfig):
    stats, rejects, docs = StepStats(), Rejects(), []
    for part in plan_parts([cfg]):
        docs += list(read_part(part, cfg, stats, rejects))
    return docs, stats, rejects


def _jsonl_bytes(records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_jsonl_plain_and_compressed(tmp_path, suffix):
    data = _jsonl_bytes(RECORDS)
    path = tmp_path / f"in{suffix}"
    if suffix.endswith(".gz"):
        data = gzip.compress(data)
    elif suffix.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    docs, stats, rejects = _read_all(InputConfig(path=str(path)))
    assert [d.id for d in docs] == [r["id"] for r in RECORDS]
    assert docs[3].text == "text number 3"
    assert docs[3].meta == {"source": "s", "n": 3, "lang": "en"}  # nested meta merged, other fields kept
    assert docs[3].source == f"{path}:4"
    assert stats.docs_in == stats.docs_out == 25 and rejects.count == 0


def test_parquet_arrow_feather_and_datasets_agree(tmp_path):
    table = pa.Table.from_pylist([{k: v for k, v in r.items() if k != "meta"} for r in RECORDS])
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=7)
    feather.write_feather(table, tmp_path / "in.feather")
    with pa.OSFile(str(tmp_path / "in.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table, max_chunksize=6)
    expected = [(r["id"], r["text"], {"lang": "en"}) for r in RECORDS]
    for name in ("in.parquet", "in.feather", "in.arrow"):
        docs, stats, _ = _read_all(InputConfig(path=str(tmp_path / name), batch_size=4))
        assert [(d.id, d.text, d.meta) for d in docs] == expected, name
    import datasets
    datasets.Dataset.from_list(RECORDS[:10]).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(RECORDS[10:20]),
            "test": datasets.Dataset.from_list(RECORDS[20:]),
        }
    ).save_to_disk(str(tmp_path / "dd"))
    docs, _, _ = _read_all(InputConfig(path=str(tmp_path / "ds")))
    assert [d.id for d in docs] == [r["id"] for r in RECORDS[:10]]
    assert docs[0].meta == {"source": "s", "n": 0, "lang": "en"}
    docs, _, _ = _read_all(InputConfig(path=str(tmp_path / "dd")))
    assert [d.id for d in docs] == [r["id"] for r in RECORDS[10:]]


@pytest.mark.parametrize("name", ["in.jsonl.zst", "in.jsonl.gz", "in.parquet", "in.arrow"])
def test_split_parts_cover_every_record_once_in_order(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(RECORDS), path, row_group_size=4)
    elif name.endswith(".arrow"):
        feather.write_feather(pa.Table.from_pylist(RECORDS), path, chunksize=3)
    else:
        raw = _jsonl_bytes(RECORDS)
        path.write_bytes(
            gzip.compress(raw) if name.endswith(".gz") else zstandard.ZstdCompressor().compress(raw)
        )
    cfg = InputConfig(path=str(path), split=4, batch_size=2)
    parts = plan_parts([cfg])
    assert len(parts) == 4 and parts[-1].stop is None
    docs, stats, _ = _read_all(cfg)
    assert [d.id for d in docs] == [r["id"] for r in RECORDS]


def test_text_tree_by_glob(tmp_path):
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "src" / "a.py").write_text("print('a')\n")
    (tmp_path / "src" / "pkg" / "b.py").write_text("x = 1\n")
    (tmp_path / "src" / "pkg" / "notes.txt").write_text("not python\n")
    (tmp_path / "src" / "pkg" / "bad.py").write_bytes(b"x = '\xff\xfe'\n")
    (tmp_path / "src" / "pkg" / "empty.py").write_bytes(b"")
    cfg = InputConfig(path=str(tmp_path / "src"), format="text", glob="**/*.py", split=2)
    docs, stats, rejects = _read_all(cfg)
    assert [d.id for d in docs] == ["a.py", "pkg/b.py"]  # the file path is the id
    assert docs[1].text == "x = 1\n" and docs[1].meta["path"] == "pkg/b.py"
    assert dict(stats.removed) == {"not_utf8": 1, "empty_file": 1}
    assert {r["id"] for r in rejects.records} == {"pkg/bad.py", "pkg/empty.py"}


def test_corrupt_inputs_are_counted_recorded_and_skipped(tmp_path):
    good = [json.dumps({"id": f"g{i}", "text": f"good {i}"}).encode() for i in range(6)]
    lines = [
        good[0],
        b'{"id": "broken", "text": ',
        good[1],
        b'{"id": "x", "text": "caf\xe9"}',
        good[2],
        b'{"id": "nofield", "body": "where is the text"}',
        b'{"id": "num", "text": 42}',
        b"[1, 2]",
        b"",
        good[3],
    ]
    (tmp_path / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    whole = gzip.compress(b"".join(g + b"\n" for g in good[4:] * 2000))
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "empty.jsonl").write_bytes(b"")
    zst = zstandard.ZstdCompressor().compress(b"".join(g + b"\n" for g in good * 20000))
    (tmp_path / "cut.jsonl.zst").write_bytes(zst[: len(zst) - 40])
    docs, stats, rejects = _read_all(InputConfig(path=str(tmp_path)))
    assert dict(stats.removed) == {
        "bad_json": 1,
        "not_utf8": 1,
        "missing_text": 1,
        "text_not_string": 1,
        "not_an_object": 1,
        "truncated": 2,
        "empty_file": 1,
    }
    mixed = [d.id for d in docs if d.source.startswith(str(tmp_path / "mixed.jsonl"))]
    assert mixed == ["g0", "g1", "g2", "g3"]  # everything around the bad lines survives
    for name in ("cut.jsonl.gz", "cut.jsonl.zst"):  # the readable head of a cut file is kept
        assert any(d.source.startswith(str(tmp_path / name)) for d in docs)
    by_reason = {r["reason"]: r for r in rejects.records}
    assert by_reason["bad_json"]["source"] == f"{tmp_path / 'mixed.jsonl'}:2"
    assert by_reason["not_utf8"]["source"] == f"{tmp_path / 'mixed.jsonl'}:4"
    assert by_reason["missing_text"]["source"] == f"{tmp_path / 'mixed.jsonl'}:6"
    assert "where is the text" in by_reason["missing_text"]["text"]  # the raw record is kept
    assert by_reason["empty_file"]["source"] == str(tmp_path / "empty.jsonl")
    assert stats.docs_in == stats.docs_out + sum(stats.removed.values())


def test_corrupt_parquet_is_one_counted_error(tmp_path):
    pq.write_table(pa.Table.from_pylist(RECORDS), tmp_path / "ok.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    docs, stats, rejects = _read_all(InputConfig(path=str(tmp_path)))
    assert len(docs) == 25 and dict(stats.removed) == {"unreadable_file": 1}
    assert rejects.records[0]["source"] == str(tmp_path / "bad.parquet")


def test_missing_inputs_are_one_line_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"inputs\[0\]\.path: .*nope\.jsonl: no such file"):
        plan_parts([InputConfig(path=str(tmp_path / "nope.jsonl"))])
    with pytest.raises(ConfigError, match="matches no file"):
        plan_parts([InputConfig(path=str(tmp_path / "*.parquet"))])
    (tmp_path / "notes.md").write_text("hi")
    with pytest.raises(ConfigError, match="no jsonl/parquet/arrow files"):
        plan_parts([InputConfig(path=str(tmp_path))])


@pytest.mark.parametrize("cls,name", [(JsonlZstWriter, "o.jsonl.zst"), (ParquetWriter, "o.parquet")])
def test_our_outputs_read_back(tmp_path, cls, name):
    records = [{"id": r["id"], "text": r["text"], "meta": r["meta"]} for r in RECORDS]
    writer = cls(tmp_path / name)
    for r in records:
        writer.write(r)
    assert not (tmp_path / name).exists()  # atomic: nothing under the final name before close
    writer.close()
    docs = list(iter_documents(tmp_path / name))
    assert [(d.id, d.text, d.meta) for d in docs] == [(r["id"], r["text"], r["meta"]) for r in records]
    # and as pipeline inputs, meta comes back as a mapping
    docs, _, _ = _read_all(InputConfig(path=str(tmp_path / name)))
    assert docs[5].meta == {"source": "s", "n": 5}
