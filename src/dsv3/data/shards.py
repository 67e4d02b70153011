"""Token shards in Megatron's indexed-dataset format (`.bin` + `.idx`), and a memory-mapped reader.

`prefix.bin` holds every document's tokens back to back. `prefix.idx` is, little-endian:

    b"MMIDIDX\\x00\\x00"   magic (9 bytes)
    uint64 1              version
    uint8  dtype code     1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16
    uint64 S              number of sequences
    uint64 D              number of entries in the document index (documents + 1)
    int32[S]              sequence lengths in tokens
    int64[S]              byte offset of each sequence in .bin
    int64[D]              document index: 0, then the sequence count after each document

which is what megatron-core's `IndexedDataset` (formerly `MMapIndexedDataset`) reads. Here every
document is one sequence. `write_token_shards` appends EOS to each document, assigns it to train
or valid by a hash of (seed, its id or index) so reruns agree, and rolls over to a new shard
after `max_tokens_per_shard` tokens: `out_dir/{train,valid}/shard_00000.{bin,idx}`, plus
`out_dir/shards.json` with the counts.

Public API: `ShardError`, `DTYPE_CODES`, `token_dtype(vocab_size)`, `IndexedDatasetWriter(prefix,
dtype)` (`add_document`, `finalize`), `IndexedDataset(prefix)` (`len`, `[i]`, `sizes`, `dtype`,
`num_tokens`, `tokens`, `document_indices`), `write_token_shards(...) -> dict`.
"""

from __future__ import annotations

import logging
import shutil
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from dsv3.io import atomic_open, commit, publish_dir, sweep_temps, temp_path, write_json_atomic

__all__ = [
    "ShardError",
    "DTYPE_CODES",
    "token_dtype",
    "IndexedDatasetWriter",
    "IndexedDataset",
    "write_token_shards",
]

log = logging.getLogger(__name__)

MAGIC = b"MMIDIDX\x00\x00"
SPLITS = ("train", "valid")
VERSION = 1
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8), 2: np.dtype(np.int8), 3: np.dtype(np.int16), 4: np.dtype(np.int32),
    5: np.dtype(np.int64), 6: np.dtype(np.float64), 7: np.dtype(np.float32), 8: np.dtype(np.uint16),
}
_CODE_OF = {dtype: code for code, dtype in DTYPE_CODES.items()}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, document index entries


class ShardError(ValueError):
    """A shard that cannot be read or written, described in one line naming the file."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest dtype Megatron uses for token ids of this vocabulary (uint16 below 65500)."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


class IndexedDatasetWriter:
    """Writes one `.bin`/`.idx` pair; nothing appears under `prefix` until `finalize()` succeeds."""

    def __init__(self, prefix: Path | str, dtype: np.dtype | type | str = np.uint16):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF:
            known = ", ".join(sorted(map(str, _CODE_OF)))
            raise ShardError(f"{self.prefix}: dtype {self.dtype} has no Megatron code (one of {known})")
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._info = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None
        self._bin_tmp = temp_path(self._file(".bin"))
        self._bin = open(self._bin_tmp, "wb")  # noqa: SIM115 (closed by finalize or abort)
        self._sizes: list[int] = []
        self.num_tokens = 0

    def _file(self, suffix: str) -> Path:
        return self.prefix.with_name(self.prefix.name + suffix)

    def add_document(self, tokens: Iterable[int] | np.ndarray) -> None:
        """Append one document (one sequence); token ids must fit the dtype."""
        array = np.asarray(tokens)
        if array.ndim != 1:
            raise ShardError(f"{self.prefix}: a document must be a 1-D token array, got shape {array.shape}")
        if self._info is not None and array.size:
            lo, hi = int(array.min()), int(array.max())
            if lo < self._info.min or hi > self._info.max:
                raise ShardError(f"{self.prefix}: token ids [{lo}, {hi}] do not fit {self.dtype}")
        if array.size > np.iinfo(np.int32).max:
            raise ShardError(f"{self.prefix}: a document of {array.size} tokens overflows the int32 length")
        self._bin.write(array.astype(self.dtype, copy=False).tobytes())
        self._sizes.append(int(array.size))
        self.num_tokens += int(array.size)

    def __len__(self) -> int:
        return len(self._sizes)

    def finalize(self) -> Path:
        """Write the index, fsync both files and move them into place (.bin first, then .idx)."""
        self._bin.close()
        sizes = np.asarray(self._sizes, dtype=np.int32)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        np.cumsum(sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_index = np.arange(len(sizes) + 1, dtype=np.int64)
        header = _HEADER.pack(MAGIC, VERSION, _CODE_OF[self.dtype], len(sizes), len(doc_index))
        commit(self._bin_tmp, self._file(".bin"))  # the .idx last: its presence marks the pair complete
        with atomic_open(self._file(".idx")) as f:
            f.write(header + sizes.tobytes() + pointers.tobytes() + doc_index.tobytes())
        return self.prefix

    def abort(self) -> None:
        """Drop what was written; the prefix is left as it was."""
        self._bin.close()
        self._bin_tmp.unlink(missing_ok=True)

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


class IndexedDataset:
    """Memory-mapped reader of a `.bin`/`.idx` pair; every inconsistency is a one-line ShardError."""

    def __init__(self, prefix: Path | str):
        self.prefix = Path(prefix)
        if self.prefix.suffix in (".bin", ".idx"):
            self.prefix = self.prefix.with_suffix("")
        idx_path = self.prefix.with_name(self.prefix.name + ".idx")
        bin_path = self.prefix.with_name(self.prefix.name + ".bin")
        for path in (idx_path, bin_path):
            if not path.is_file():
                raise ShardError(f"{path}: no such shard file")
        raw = idx_path.read_bytes()
        if len(raw) < _HEADER.size:
            raise ShardError(f"{idx_path}: truncated header ({len(raw)} bytes, expected {_HEADER.size})")
        magic, version, code, n_seq, n_doc = _HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise ShardError(f"{idx_path}: bad magic {magic!r}, not a Megatron indexed dataset")
        if version != VERSION:
            raise ShardError(f"{idx_path}: unsupported version {version} (expected {VERSION})")
        if code not in DTYPE_CODES:
            raise ShardError(f"{idx_path}: unknown dtype code {code}")
        self.dtype = DTYPE_CODES[code]
        expected = _HEADER.size + 12 * n_seq + 8 * n_doc
        if len(raw) not in (expected, expected + n_seq):  # + n_seq: the optional multimodal modes
            raise ShardError(f"{idx_path}: {len(raw)} bytes, expected {expected} for {n_seq} sequences")
        offset = _HEADER.size
        self.sizes = np.frombuffer(raw, np.int32, n_seq, offset)
        self.pointers = np.frombuffer(raw, np.int64, n_seq, offset + 4 * n_seq)
        self.document_indices = np.frombuffer(raw, np.int64, n_doc, offset + 12 * n_seq)
        self.num_tokens = int(self.sizes.sum(dtype=np.int64))
        nbytes = bin_path.stat().st_size
        if nbytes != self.num_tokens * self.dtype.itemsize:
            raise ShardError(
                f"{bin_path}: {nbytes} bytes, but {idx_path.name} lists {self.num_tokens} tokens of "
                f"{self.dtype} ({self.num_tokens * self.dtype.itemsize} bytes): truncated or mismatched"
            )
        starts = np.concatenate(([0], np.cumsum(self.sizes[:-1], dtype=np.int64))) * self.dtype.itemsize
        if np.any(self.sizes < 0) or not np.array_equal(self.pointers, starts[:n_seq]):
            raise ShardError(f"{idx_path}: sequence pointers do not match the sequence lengths")
        docs = self.document_indices
        if n_doc == 0 or docs[0] != 0 or docs[-1] != n_seq or np.any(np.diff(docs) < 0):
            raise ShardError(f"{idx_path}: document index must rise from 0 to {n_seq}")
        if self.num_tokens:
            self.tokens = np.memmap(bin_path, dtype=self.dtype, mode="r")
        else:  # numpy cannot map an empty file
            self.tokens = np.zeros(0, dtype=self.dtype)

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        """Tokens of sequence i (a read-only view into the map)."""
        n = len(self.sizes)
        if not -n <= i < n:
            raise IndexError(f"{self.prefix}: sequence {i} out of range [0, {n})")
        i %= n
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start : start + int(self.sizes[i])]

    def __repr__(self) -> str:
        return f"IndexedDataset('{self.prefix}', {len(self)} docs, {self.num_tokens} tokens, {self.dtype})"


def _in_valid(key: str, seed: int, valid_fraction: float) -> bool:
    return xxhash.xxh3_64_intdigest(f"{seed}:{key}".encode()) < valid_fraction * 2.0**64


class _SplitWriter:
    """Rolls shards of one split over at `max_tokens` tokens."""

    def __init__(self, folder: Path, dtype: np.dtype, max_tokens: int):
        self.folder, self.dtype, self.max_tokens = folder, dtype, max_tokens
        self.shards: list[str] = []
        self.documents = self.tokens = 0
        self.writer: IndexedDatasetWriter | None = None

    def add(self, tokens: np.ndarray) -> None:
        if self.writer is None:
            self.writer = IndexedDatasetWriter(self.folder / f"shard_{len(self.shards):05d}", self.dtype)
        self.writer.add_document(tokens)
        self.documents += 1
        self.tokens += len(tokens)
        if self.writer.num_tokens >= self.max_tokens:
            self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.shards.append(self.writer.finalize().name)
            self.writer = None

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()

    def summary(self) -> dict[str, Any]:
        return {"documents": self.documents, "tokens": self.tokens, "shards": self.shards}


def write_token_shards(
    token_docs: Iterable[np.ndarray | tuple[str, np.ndarray]],
    out_dir: Path | str,
    valid_fraction: float = 0.01,
    seed: int = 0,
    eos_id: int | None = None,
    max_tokens_per_shard: int = 1 << 30,
    dtype: np.dtype | type | str = np.uint16,
) -> dict[str, Any]:
    """Write tokenized documents (arrays, or (id, array) pairs) as train/valid shards under out_dir.

    EOS is appended to every document unless `eos_id` is None; empty documents are skipped. The
    split of a document depends only on (seed, its id, or its index when no id is given). The
    `train/` and `valid/` folders are replaced as a whole at the end, so a crash leaves the old ones.
    """
    if not 0.0 <= valid_fraction < 1.0:
        raise ShardError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    if max_tokens_per_shard < 1:
        raise ShardError(f"max_tokens_per_shard must be positive, got {max_tokens_per_shard}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sweep_temps(out_dir)  # the staging folder of a run that was killed
    staging = temp_path(out_dir / "shards")
    staging.mkdir()
    splits = {name: _SplitWriter(staging / name, np.dtype(dtype), max_tokens_per_shard) for name in SPLITS}
    skipped = 0
    try:
        for index, item in enumerate(token_docs):
            key, tokens = item if isinstance(item, tuple) else (str(index), item)
            tokens = np.asarray(tokens)
            if tokens.size == 0:
                skipped += 1
                continue
            if eos_id is not None:
                tokens = np.append(tokens, eos_id)
            splits["valid" if _in_valid(str(key), seed, valid_fraction) else "train"].add(tokens)
        for split in splits.values():
            split.close()
    except BaseException:
        for split in splits.values():
            split.abort()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for name in splits:  # swap each split folder in whole; no stale shard of an older run survives
        (staging / name).mkdir(exist_ok=True)
        publish_dir(staging / name, out_dir / name)
    summary = {
        "dtype": str(np.dtype(dtype)), "eos_id": eos_id, "valid_fraction": valid_fraction, "seed": seed,
        "skipped_empty": skipped, **{name: split.summary() for name, split in splits.items()},
    }
    write_json_atomic(out_dir / "shards.json", summary)
    shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote %d train / %d valid documents (%d / %d tokens) to %s", splits["train"].documents,
             splits["valid"].documents, splits["train"].tokens, splits["valid"].tokens, out_dir)
    return summary
