"""Record writers for the pipeline's outputs: jsonl.zst and parquet, and numpy archives.

Each file is written under `dsv3.io`'s temp name and committed on `close`, so a crash never
leaves a half-written file under the final name (resume relies on that).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from dsv3.io import atomic_open, commit, temp_path

__all__ = [
    "OUTPUT_FORMATS",
    "JsonlZstWriter",
    "ParquetWriter",
    "open_writer",
    "output_suffix",
    "save_npz_atomic",
]

OUTPUT_FORMATS = ("jsonl.zst", "parquet")
_PARQUET_BATCH = 1000  # rows buffered per row group write


def output_suffix(fmt: str) -> str:
    return ".jsonl.zst" if fmt == "jsonl.zst" else ".parquet"


class JsonlZstWriter:
    """One JSON object per line, zstd-compressed; appears under `path` only on `close`."""

    def __init__(self, path: Path | str, level: int = 3):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = temp_path(self.path)
        self._raw = open(self._tmp, "wb")  # noqa: SIM115 (closed by close/abort)
        self._out = zstandard.ZstdCompressor(level=level).stream_writer(self._raw, closefd=False)
        self.count = 0

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False).encode("utf-8", "surrogatepass")
        self._out.write(line + b"\n")
        self.count += 1

    def close(self) -> Path:
        self._out.close()
        self._raw.close()
        commit(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._out.close()
        self._raw.close()
        self._tmp.unlink(missing_ok=True)


class ParquetWriter:
    """Documents as parquet rows (id, text, meta as a JSON string: metas differ between records)."""

    def __init__(self, path: Path | str):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = temp_path(self.path)
        self._schema = pa.schema([("id", pa.string()), ("text", pa.string()), ("meta", pa.string())])
        self._writer = pq.ParquetWriter(self._tmp, self._schema, compression="zstd")
        self._rows: dict[str, list] = {"id": [], "text": [], "meta": []}
        self.count = 0

    def write(self, record: dict[str, Any]) -> None:
        self._rows["id"].append(str(record["id"]))
        self._rows["text"].append(record["text"])
        self._rows["meta"].append(json.dumps(record.get("meta") or {}, ensure_ascii=False))
        self.count += 1
        if len(self._rows["id"]) >= _PARQUET_BATCH:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self._rows["id"]:
            self._writer.write_table(pa.Table.from_pydict(self._rows, schema=self._schema))
            self._rows = {"id": [], "text": [], "meta": []}

    def close(self) -> Path:
        self._flush()
        self._writer.close()
        commit(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._writer.close()
        self._tmp.unlink(missing_ok=True)


def open_writer(path: Path | str, fmt: str) -> JsonlZstWriter | ParquetWriter:
    """A writer of the output format (`jsonl.zst` or `parquet`)."""
    if fmt == "jsonl.zst":
        return JsonlZstWriter(path)
    if fmt == "parquet":
        return ParquetWriter(path)
    raise ValueError(f"unknown output format {fmt!r} (one of {', '.join(OUTPUT_FORMATS)})")


def save_npz_atomic(path: Path | str, **arrays: np.ndarray) -> None:
    with atomic_open(path) as f:
        np.savez(f, **arrays)
