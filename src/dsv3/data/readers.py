"""Streaming readers: jsonl (plain, .gz, .zst), parquet, arrow/feather, `datasets` saved to disk,
and trees of text or source files selected by a glob.

Inputs are cut into parts (a file, or a range of its records) that workers read independently;
memory is bounded by one line, one record batch, or one source file. A record that cannot be
parsed (bad JSON, non-UTF-8 bytes, missing text field, truncated or empty file) never stops the
run: it is counted under its reason, logged with file and line (or row), written to the rejects
file and skipped.

Public API: `INPUT_FORMATS`, `InputConfig`, `Part`, `input_files`, `plan_parts`, `read_part`,
`iter_documents` (the pipeline's own jsonl.zst / parquet outputs, strictly).
"""

from __future__ import annotations

import contextlib
import glob as globlib
import gzip
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dsv3.config import ConfigError
from dsv3.data.document import Document, Rejects, StepStats, utf8_len

__all__ = ["INPUT_FORMATS", "InputConfig", "Part", "input_files", "plan_parts", "read_part", "iter_documents"]

log = logging.getLogger(__name__)

INPUT_FORMATS = ("jsonl", "parquet", "arrow", "hf_dataset", "text")
_SUFFIXES = {
    "jsonl": (
        ".jsonl",
        ".json",
        ".ndjson",
        ".jsonl.gz",
        ".json.gz",
        ".ndjson.gz",
        ".jsonl.zst",
        ".json.zst",
        ".ndjson.zst",
    ),
    "parquet": (".parquet",),
    "arrow": (".arrow", ".feather", ".ipc"),
}
_CHUNK = 1 << 20
_RAW_KEEP = 2000  # characters of an unparseable record kept in the rejects file
_LOGGED_PER_PART = 5  # reader errors logged as warnings per part; the rest at debug (all in rejects)


class InputConfig(BaseModel):
    """One input: a file, a glob, a folder of data files, a saved `datasets` dataset or a text tree."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="file, glob pattern, or directory")
    format: Literal["auto", "jsonl", "parquet", "arrow", "hf_dataset", "text"] = Field(
        default="auto", description="auto: by extension; a directory holding state.json is hf_dataset"
    )
    text_field: str = "text"
    id_field: str | None = Field(default="id", description="records without it get 'file:line' as id")
    meta_field: str | None = Field(default="meta", description="a mapping field merged into meta")
    glob: str = Field(default="**/*", description="text trees: which files, relative to path")
    split: int = Field(default=1, ge=1, description="cut each file into this many parts for the workers")
    batch_size: int = Field(default=1024, ge=1, description="parquet/arrow rows per read batch")
    max_file_bytes: int = Field(default=10 << 20, ge=1, description="text trees: larger files are rejected")


@dataclass(frozen=True)
class Part:
    """A unit of work: records [start, stop) of one file (stop None: to the end)."""

    name: str
    input: int
    path: str
    format: str
    start: int = 0
    stop: int | None = None


def _format_of(path: Path) -> str | None:
    name = path.name.lower()
    for fmt, suffixes in _SUFFIXES.items():
        if name.endswith(suffixes):
            return fmt
    return None


def _hf_arrow_files(root: Path) -> list[Path]:
    """The arrow files of a `Dataset.save_to_disk` folder, or of every split of a DatasetDict."""
    if (root / "dataset_dict.json").is_file():
        splits = json.loads((root / "dataset_dict.json").read_text())["splits"]
        return [f for split in splits for f in _hf_arrow_files(root / split)]
    state = root / "state.json"
    if not state.is_file():
        raise ConfigError(f"{root}: not a saved datasets dataset (no state.json or dataset_dict.json)")
    return [root / entry["filename"] for entry in json.loads(state.read_text())["_data_files"]]


def input_files(cfg: InputConfig, where: str = "input") -> list[tuple[Path, str]]:
    """(path, format) of every file this input names; a text tree is one entry (its root)."""
    base = Path(cfg.path)
    if any(ch in cfg.path for ch in "*?["):
        paths = [Path(p) for p in sorted(globlib.glob(cfg.path, recursive=True)) if Path(p).is_file()]
        if not paths:
            raise ConfigError(f"{where}.path: {cfg.path}: the pattern matches no file")
    elif base.is_dir():
        if cfg.format == "text":
            return [(base, "text")]
        if cfg.format == "hf_dataset" or (
            cfg.format == "auto"
            and ((base / "state.json").is_file() or (base / "dataset_dict.json").is_file())
        ):
            return [(p, "arrow") for p in _hf_arrow_files(base)]
        paths = sorted(p for p in base.rglob("*") if p.is_file() and _format_of(p) is not None)
        if not paths:
            raise ConfigError(
                f"{where}.path: {base}: no jsonl/parquet/arrow files in this folder "
                "(for a tree of text or source files set format: text and a glob)"
            )
    elif base.is_file():
        paths = [base]
    else:
        raise ConfigError(f"{where}.path: {base}: no such file or directory")
    out = []
    for p in paths:
        fmt = cfg.format if cfg.format not in ("auto", "hf_dataset") else _format_of(p)
        if cfg.format == "hf_dataset":
            fmt = "arrow"
        if fmt is None:
            raise ConfigError(
                f"{where}.path: {p}: unknown format (set format: jsonl, parquet, arrow or text)"
            )
        if fmt == "text":
            raise ConfigError(f"{where}.path: {p}: format text needs a directory (with a glob)")
        out.append((p, fmt))
    return out


def _text_tree(root: Path, pattern: str) -> list[Path]:
    return sorted(
        (p for p in root.glob(pattern) if p.is_file()), key=lambda p: p.relative_to(root).as_posix()
    )


def _count_records(path: Path, fmt: str, cfg: InputConfig) -> int:
    """Records in a file (lines for jsonl), to cut it into parts; unreadable tails count as nothing."""
    if fmt == "text":
        return len(_text_tree(path, cfg.glob))
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        if fmt == "arrow":
            return sum(batch.num_rows for batch in _arrow_batches(path))
        count, last = 0, b"\n"
        for chunk in _byte_chunks(path):
            count += chunk.count(b"\n")
            last = chunk[-1:] or last
        return count + (last != b"\n")
    except Exception as e:  # a corrupt file is reported by the part that reads it
        log.debug("counting %s stopped: %s", path, e)
        return 0


def plan_parts(inputs: list[InputConfig]) -> list[Part]:
    """Every part of every input, in input order: the order that 'first in input order' refers to."""
    parts: list[Part] = []
    for i, cfg in enumerate(inputs):
        for path, fmt in input_files(cfg, f"inputs[{i}]"):
            n = _count_records(path, fmt, cfg) if cfg.split > 1 else 0
            size = math.ceil(n / cfg.split) if n else 0
            bounds = [(k * size, (k + 1) * size) for k in range(cfg.split) if k * size < n] or [(0, None)]
            bounds[-1] = (bounds[-1][0], None)  # the last part reads to the end, whatever it holds
            for start, stop in bounds:
                parts.append(Part(f"part-{len(parts):05d}", i, str(path), fmt, start, stop))
    return parts


# ------------------------------------------------------------------------------------------------
# Raw access
# ------------------------------------------------------------------------------------------------


class _Truncated(Exception):
    pass


def _byte_chunks(path: Path) -> Iterator[bytes]:
    """Decompressed bytes of a (.gz/.zst) file; a file cut short raises `_Truncated`."""
    name = path.name.lower()
    if name.endswith(".zst"):
        import zstandard

        dctx = zstandard.ZstdDecompressor()
        with open(path, "rb") as f:
            dobj, fed = dctx.decompressobj(), False
            while chunk := f.read(_CHUNK):
                while chunk:
                    fed = True
                    yield dobj.decompress(chunk)
                    if dobj.eof:  # a frame ended; more frames may follow
                        chunk, dobj, fed = dobj.unused_data, dctx.decompressobj(), False
                    else:
                        chunk = b""
            if fed and not dobj.eof:
                raise _Truncated("zstd stream ends inside a frame")
        return
    opener = gzip.open if name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            while chunk := f.read1(_CHUNK):  # read1: what is decodable, so a cut file keeps its head
                yield chunk
    except EOFError as e:
        raise _Truncated(str(e)) from None


def _lines(path: Path) -> Iterator[bytes]:
    """Lines of a (compressed) file, without their newline."""
    pending: list[bytes] = []
    for chunk in _byte_chunks(path):
        pieces = chunk.split(b"\n")
        if len(pieces) == 1:
            pending.append(chunk)
            continue
        pieces[0] = b"".join(pending) + pieces[0]
        pending = [pieces.pop()]
        yield from pieces
    tail = b"".join(pending)
    if tail:
        yield tail


def _arrow_batches(path: Path, batch_size: int | None = None):
    """Record batches of an Arrow IPC file (feather v2) or stream (what `datasets` writes)."""
    import pyarrow as pa

    source = pa.memory_map(str(path))
    try:
        reader = pa.ipc.open_file(source)
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    except pa.ArrowInvalid:
        source.seek(0)
        batches = iter(pa.ipc.open_stream(source))
    for batch in batches:
        if batch_size is None or batch.num_rows <= batch_size:
            yield batch
        else:
            for lo in range(0, batch.num_rows, batch_size):
                yield batch.slice(lo, batch_size)


# ------------------------------------------------------------------------------------------------
# Records to documents
# ------------------------------------------------------------------------------------------------


class _PartReader:
    """Reads one part, turning records into documents and problems into counted rejects."""

    def __init__(self, part: Part, cfg: InputConfig, stats: StepStats, rejects: Rejects):
        self.part, self.cfg, self.stats, self.rejects = part, cfg, stats, rejects
        self.errors = 0

    def bad(self, source: str, reason: str, detail: str, raw: str = "", nbytes: int = 0) -> None:
        self.errors += 1
        self.stats.docs_in += 1
        self.stats.bytes_in += nbytes
        self.stats.removed[reason] += 1
        self.rejects.add(Document(id=source, text=raw[:_RAW_KEEP], source=source), reason, error=detail)
        level = logging.WARNING if self.errors <= _LOGGED_PER_PART else logging.DEBUG
        log.log(level, "%s: skipped (%s): %s", source, reason, detail)

    def good(self, doc: Document) -> Document:
        size = utf8_len(doc.text)
        self.stats.docs_in += 1
        self.stats.docs_out += 1
        self.stats.bytes_in += size
        self.stats.bytes_out += size
        return doc

    def document(self, rec: Any, source: str) -> Document | tuple[str, str]:
        """A document from a parsed record, or (reason, detail) when it has no usable text."""
        cfg = self.cfg
        if not isinstance(rec, dict):
            return "not_an_object", f"expected a JSON object, got {type(rec).__name__}"
        if cfg.text_field not in rec:
            return "missing_text", f"no field {cfg.text_field!r} (fields: {', '.join(map(str, rec))})"
        text = rec[cfg.text_field]
        if not isinstance(text, str):
            return "text_not_string", f"{cfg.text_field!r} is {type(text).__name__}, not a string"
        ident = rec.get(cfg.id_field) if cfg.id_field else None
        meta: dict[str, Any] = {}
        nested = rec.get(cfg.meta_field) if cfg.meta_field else None
        if isinstance(nested, str) and nested.startswith("{"):  # our parquet output stores meta as JSON
            with contextlib.suppress(ValueError):
                nested = json.loads(nested)
        if isinstance(nested, dict):
            meta.update(nested)
        skip = {cfg.text_field, cfg.id_field, cfg.meta_field if isinstance(nested, dict) else None}
        meta.update((k, v) for k, v in rec.items() if k not in skip)
        return Document(id=source if ident is None else str(ident), text=text, meta=meta, source=source)

    def emit(self, rec: Any, source: str, raw: str = "", nbytes: int = 0) -> Iterator[Document]:
        result = self.document(rec, source)
        if isinstance(result, Document):
            yield self.good(result)
        else:
            self.bad(source, *result, raw=raw or _preview(rec), nbytes=nbytes)

    # --- formats ----------------------------------------------------------------------------

    def jsonl(self) -> Iterator[Document]:
        path, (start, stop) = Path(self.part.path), (self.part.start, self.part.stop)
        index = -1
        try:
            for index, line in enumerate(_lines(path)):
                if index < start:
                    continue
                if stop is not None and index >= stop:
                    return
                source = f"{path}:{index + 1}"
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    raw = line.decode("utf-8", "replace")
                    self.bad(source, "not_utf8", f"invalid UTF-8 at byte {e.start}", raw, len(line))
                    continue
                if not text.strip():
                    continue
                try:
                    rec = json.loads(text)
                except ValueError as e:
                    self.bad(source, "bad_json", str(e), text, len(line))
                    continue
                yield from self.emit(rec, source, text, len(line))
        except _Truncated as e:
            self.bad(f"{path}:{index + 2}", "truncated", f"file ends early after line {index + 1}: {e}")
            return
        except OSError as e:
            self.bad(str(path), "unreadable_file", f"{type(e).__name__}: {e}")
            return
        if index < 0 and start == 0:
            self.bad(str(path), "empty_file", "the file holds no records")

    def batches(self) -> Iterator[Document]:
        """Parquet and arrow: record batches, with row numbers for sources."""
        path, (start, stop) = Path(self.part.path), (self.part.start, self.part.stop)
        rows = 0
        try:
            for offset, batch in self._batches_from(path, start):
                lo = max(start - offset, 0)
                hi = batch.num_rows if stop is None else min(batch.num_rows, stop - offset)
                if hi <= lo:
                    if stop is not None and offset >= stop:
                        return
                    continue
                for row, rec in enumerate(batch.slice(lo, hi - lo).to_pylist(), offset + lo):
                    rows += 1
                    yield from self.emit(rec, f"{path}:row {row}")
        except Exception as e:  # pyarrow raises several types for corrupt files
            self.bad(str(path), "unreadable_file", f"{type(e).__name__}: {str(e).splitlines()[0]}")
            return
        if rows == 0 and start == 0 and stop is None:
            self.bad(str(path), "empty_file", "the file holds no rows")

    def _batches_from(self, path: Path, start: int):
        """(first row number, batch) pairs; parquet skips the row groups before `start`."""
        if self.part.format == "parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            groups, offset, first = [], 0, None
            for g in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                if offset + n > start and (self.part.stop is None or offset < self.part.stop):
                    groups.append(g)
                    first = offset if first is None else first
                offset += n
            if not groups:
                return
            for batch in pf.iter_batches(batch_size=self.cfg.batch_size, row_groups=groups):
                yield first, batch
                first += batch.num_rows
            return
        offset = 0
        for batch in _arrow_batches(path, self.cfg.batch_size):
            yield offset, batch
            offset += batch.num_rows

    def text_tree(self) -> Iterator[Document]:
        root = Path(self.part.path)
        files = _text_tree(root, self.cfg.glob)
        for path in files[self.part.start : self.part.stop]:
            rel = path.relative_to(root).as_posix()
            size = path.stat().st_size
            if size > self.cfg.max_file_bytes:
                self.bad(
                    rel, "too_large", f"{size} bytes > max_file_bytes {self.cfg.max_file_bytes}", nbytes=size
                )
                continue
            data = path.read_bytes()
            if not data.strip():
                self.bad(rel, "empty_file", "the file holds no text", nbytes=size)
                continue
            if b"\x00" in data:
                self.bad(rel, "binary", "NUL bytes: not a text file", nbytes=size)
                continue
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raw = data.decode("utf-8", "replace")
                self.bad(rel, "not_utf8", f"invalid UTF-8 at byte {e.start}", raw, size)
                continue
            meta = {"path": rel, "suffix": path.suffix}
            yield self.good(Document(id=rel, text=text, meta=meta, source=str(path)))


def _preview(rec: Any) -> str:
    try:
        return json.dumps(rec, ensure_ascii=False, default=str)[:_RAW_KEEP]
    except (TypeError, ValueError):
        return repr(rec)[:_RAW_KEEP]


def read_part(part: Part, cfg: InputConfig, stats: StepStats, rejects: Rejects) -> Iterator[Document]:
    """The documents of one part; problems are counted in `stats` and recorded in `rejects`."""
    reader = _PartReader(part, cfg, stats, rejects)
    if part.format == "jsonl":
        return reader.jsonl()
    if part.format in ("parquet", "arrow"):
        return reader.batches()
    if part.format == "text":
        return reader.text_tree()
    raise ValueError(f"{part.path}: unknown format {part.format!r}")


def iter_documents(path: Path | str, batch_size: int = 1024) -> Iterator[Document]:
    """Documents of a file the pipeline wrote ({id, text, meta[, source]} jsonl.zst or parquet).

    Strict: our own files are never corrupt unless something is badly wrong, so errors raise.
    """
    path = Path(path)
    if path.name.endswith(".parquet"):
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
            for rec in batch.to_pylist():
                yield Document(rec["id"], rec["text"], json.loads(rec["meta"] or "{}"), rec.get("source", ""))
        return
    for line in _lines(path):
        rec = json.loads(line)
        yield Document(rec["id"], rec["text"], rec.get("meta") or {}, rec.get("source", ""))
