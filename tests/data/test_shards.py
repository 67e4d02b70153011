"""Shards: the Megatron indexed-dataset format byte for byte, megatron-core reading our files,
one-line errors for corrupt shards, and a deterministic train/valid split."""

from __future__ import annotations

import json
import struct
import warnings

import numpy as np
import pytest

from dsv3.data.shards import (
    IndexedDataset,
    IndexedDatasetWriter,
    ShardError,
    token_dtype,
    write_token_shards,
)
from dsv3.io import temp_path

DOCS = [[1, 2, 3], [65535], [7, 8]]


def _write(prefix, docs, dtype=np.uint16):
    with IndexedDatasetWriter(prefix, dtype) as w:
        for d in docs:
            w.add_document(np.array(d))
    return prefix


def test_files_match_the_format_byte_for_byte(tmp_path):
    _write(tmp_path / "s", DOCS)
    expected_idx = (
        b"MMIDIDX\x00\x00"
        + struct.pack("<QBQQ", 1, 8, 3, 4)  # version, uint16 code, 3 sequences, 4 document-index entries
        + struct.pack("<3i", 3, 1, 2)  # lengths
        + struct.pack("<3q", 0, 6, 8)  # byte offsets
        + struct.pack("<4q", 0, 1, 2, 3)  # document index
    )
    assert (tmp_path / "s.idx").read_bytes() == expected_idx
    assert (tmp_path / "s.bin").read_bytes() == struct.pack("<6H", 1, 2, 3, 65535, 7, 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.bin", "s.idx"]  # no temporaries left


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64, np.uint8])
def test_round_trip(tmp_path, dtype):
    rng = np.random.default_rng(0)
    hi = min(np.iinfo(dtype).max, 50_000)
    docs = [rng.integers(0, hi, size=rng.integers(0, 40)) for _ in range(50)]
    ds = IndexedDataset(_write(tmp_path / "r", docs, dtype))
    assert len(ds) == 50 and ds.dtype == np.dtype(dtype)
    assert ds.sizes.tolist() == [len(d) for d in docs]
    assert ds.num_tokens == sum(len(d) for d in docs)
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)
    np.testing.assert_array_equal(ds[-1], docs[-1])
    np.testing.assert_array_equal(ds.tokens, np.concatenate(docs))
    with pytest.raises(IndexError):
        ds[50]
    assert IndexedDataset(tmp_path / "r.bin").num_tokens == ds.num_tokens  # a file name works too


def _megatron():
    with warnings.catch_warnings():  # megatron-core warns about optional kernels at import
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def test_megatron_core_reads_our_shards_and_writes_the_same_bytes(tmp_path):
    md = _megatron()
    import torch

    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 60_000, size=rng.integers(1, 30)) for _ in range(20)]
    _write(tmp_path / "ours", docs)
    theirs = md.IndexedDataset(str(tmp_path / "ours"))
    assert len(theirs) == len(docs)
    assert theirs.sequence_lengths.tolist() == [len(d) for d in docs]
    assert theirs.document_indices.tolist() == list(range(len(docs) + 1))
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(theirs[i], d)

    builder = md.IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for d in docs:
        builder.add_item(torch.from_numpy(d.astype(np.int64)))
        builder.end_document()
    builder.finalize(str(tmp_path / "ref.idx"))
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"ours{suffix}").read_bytes() == (tmp_path / f"ref{suffix}").read_bytes()


def _corrupt(tmp_path, how):
    prefix = _write(tmp_path / "c", DOCS)
    idx, bin_ = tmp_path / "c.idx", tmp_path / "c.bin"
    raw = bytearray(idx.read_bytes())
    if how == "magic":
        raw[:4] = b"NOPE"
    elif how == "version":
        raw[9:17] = struct.pack("<Q", 2)
    elif how == "dtype":
        raw[17] = 42
    elif how == "short_header":
        raw = raw[:20]
    elif how == "truncated_idx":
        raw = raw[:-5]
    elif how == "pointers":
        raw[34 + 12 + 8 : 34 + 12 + 16] = struct.pack("<q", 2)
    elif how == "truncated_bin":
        bin_.write_bytes(bin_.read_bytes()[:-2])
    elif how == "long_bin":
        bin_.write_bytes(bin_.read_bytes() + b"\0\0")
    elif how == "missing_bin":
        bin_.unlink()
    idx.write_bytes(bytes(raw))
    return prefix


@pytest.mark.parametrize(
    "how, message",
    [
        ("magic", "bad magic"),
        ("version", "unsupported version 2"),
        ("dtype", "unknown dtype code 42"),
        ("short_header", "truncated header"),
        ("truncated_idx", r"c\.idx: \d+ bytes, expected"),
        ("pointers", "pointers do not match"),
        ("truncated_bin", r"c\.bin: 10 bytes, but c\.idx lists 6 tokens"),
        ("long_bin", r"c\.bin: 14 bytes"),
        ("missing_bin", "no such shard file"),
    ],
)
def test_corrupt_shards_give_one_line_errors(tmp_path, how, message):
    prefix = _corrupt(tmp_path, how)
    with pytest.raises(ShardError, match=message) as err:
        IndexedDataset(prefix)
    assert "\n" not in str(err.value) and "c." in str(err.value)


def test_writer_rejects_bad_tokens_and_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(ShardError, match=r"token ids \[0, 70000\] do not fit uint16"):
        _write(tmp_path / "w", [[0, 70000]])
    with pytest.raises(ShardError, match="1-D"):
        _write(tmp_path / "w", [[[1, 2]]])
    assert list(tmp_path.iterdir()) == []
    assert token_dtype(32_000) == np.uint16 and token_dtype(129_280) == np.int32


def _docs(n=300, seed=0):
    rng = np.random.default_rng(seed)
    return [(f"doc-{i}", rng.integers(0, 1000, size=rng.integers(0, 50))) for i in range(n)]


def _split_ids(out, docs):
    """Which documents landed in valid, recovered from the shard contents."""
    ds_tokens = [tuple(IndexedDataset(p)[i].tolist()) for p in sorted((out / "valid").glob("*.idx"))
                 for i in range(len(IndexedDataset(p)))]
    by_tokens = {tuple(t.tolist()) + (999_999,): key for key, t in docs}
    return {by_tokens[t] for t in ds_tokens}


def test_write_token_shards_split_is_deterministic_and_order_free(tmp_path):
    docs = _docs()
    summary = write_token_shards(docs, tmp_path / "a", valid_fraction=0.2, seed=3, eos_id=999_999,
                                 max_tokens_per_shard=2000, dtype=np.int32)
    non_empty = [d for d in docs if len(d[1])]
    assert summary["skipped_empty"] == len(docs) - len(non_empty)
    assert summary["train"]["documents"] + summary["valid"]["documents"] == len(non_empty)
    assert 0.1 < summary["valid"]["documents"] / len(non_empty) < 0.3
    assert len(summary["train"]["shards"]) > 1  # rolled over at 2000 tokens
    assert json.loads((tmp_path / "a" / "shards.json").read_text()) == summary
    train = [IndexedDataset(tmp_path / "a" / "train" / name) for name in summary["train"]["shards"]]
    assert all(ds[i][-1] == 999_999 for ds in train for i in range(len(ds)))  # EOS appended
    assert sum(ds.num_tokens for ds in train) == summary["train"]["tokens"]

    write_token_shards(docs[::-1], tmp_path / "b", valid_fraction=0.2, seed=3, eos_id=999_999, dtype=np.int32)
    assert _split_ids(tmp_path / "a", docs) == _split_ids(tmp_path / "b", docs)  # decided by id, not order
    write_token_shards(docs, tmp_path / "c", valid_fraction=0.2, seed=4, eos_id=999_999, dtype=np.int32)
    assert _split_ids(tmp_path / "a", docs) != _split_ids(tmp_path / "c", docs)


def test_rerun_replaces_old_shards_and_a_failed_run_keeps_them(tmp_path):
    docs = _docs()
    write_token_shards(docs, tmp_path, eos_id=0, max_tokens_per_shard=500)
    many = sorted(p.name for p in (tmp_path / "train").iterdir())
    write_token_shards(docs, tmp_path, eos_id=0)
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["shard_00000.bin", "shard_00000.idx"]
    assert len(many) > 2

    def failing():
        yield docs[0]
        raise RuntimeError("tokenizer crashed")

    with pytest.raises(RuntimeError):
        write_token_shards(failing(), tmp_path, eos_id=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards.json", "train", "valid"]
    assert IndexedDataset(tmp_path / "train" / "shard_00000").num_tokens > 0


def test_a_rerun_removes_the_staging_folder_of_a_killed_run(tmp_path):
    staging = temp_path(tmp_path / "shards")  # what kill -9 mid-write leaves
    (staging / "train").mkdir(parents=True)
    (staging / "train" / "shard_00000.bin").write_bytes(b"\0" * 64)
    write_token_shards(_docs(), tmp_path, eos_id=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards.json", "train", "valid"]
