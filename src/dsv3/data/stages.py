"""The per-part work of `dsv3 preprocess`, run in worker processes, and where everything lives.

Each function does one part of one stage, writes its outputs atomically and then its marker
`.state/<stage>/<part>.json` (the part's statistics): a marker exists only if the outputs do,
so a rerun skips exactly the finished parts.

    filter  read -> steps -> kept documents (+ exact keys and MinHash signatures for dedup)
    dedup   re-stream a part, keeping the documents the global clustering kept
    encode  token ids of the kept documents, for the shard writer

Public API: `Layout`, `step_dirs`, `filter_part`, `dedup_part`, `encode_part`, `pack_strings`,
`unpack_strings`, `batched`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from dsv3.data.document import Document, Rejects, Step, StepStats, utf8_len
from dsv3.data.pipeline_config import PipelineConfig, build_steps
from dsv3.data.readers import Part, iter_documents, read_part
from dsv3.data.writers import JsonlZstWriter, open_writer, output_suffix, save_npz_atomic
from dsv3.io import atomic_open, write_json_atomic

__all__ = [
    "Layout",
    "step_dirs",
    "filter_part",
    "dedup_part",
    "encode_part",
    "pack_strings",
    "unpack_strings",
    "batched",
]

T = TypeVar("T")
STATE, WORK = ".state", ".work"


@dataclass(frozen=True)
class Layout:
    """Paths under the output folder."""

    root: Path
    fmt: str = "jsonl.zst"

    def documents(self, part: str) -> Path:
        return self.root / "documents" / f"{part}{output_suffix(self.fmt)}"

    def rejects(self, step_dir: str, part: str) -> Path:
        return self.root / "rejects" / step_dir / f"{part}.jsonl.zst"

    def filtered(self, part: str) -> Path:
        return self.root / WORK / "filtered" / f"{part}.jsonl.zst"

    def features(self, part: str) -> Path:
        return self.root / WORK / "dedup" / f"{part}.npz"

    def decisions(self, part: str) -> Path:
        return self.root / WORK / "dedup" / f"{part}.removed.json"

    def tokens(self, part: str) -> tuple[Path, Path]:
        return self.root / WORK / "tokens" / f"{part}.u32", self.root / WORK / "tokens" / f"{part}.npz"

    def marker(self, stage: str, part: str | None = None) -> Path:
        return self.root / STATE / (f"{stage}.json" if part is None else f"{stage}/{part}.json")


def step_dirs(cfg: PipelineConfig) -> list[str]:
    """Names of the per-step folders (and report rows): 00_read, 01_<step>, ..., NN_dedup."""
    names = ["00_read"] + [f"{i:02d}_{spec.type}" for i, spec in enumerate(cfg.steps, 1)]
    return names + ([f"{len(cfg.steps) + 1:02d}_dedup"] if cfg.dedup is not None else [])


def batched(items: Iterable[T], n: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def pack_strings(strings: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings as one UTF-8 byte array and offsets: stored in .npz without pickles."""
    encoded = [s.encode("utf-8", "surrogatepass") for s in strings]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets


def unpack_strings(blob: np.ndarray, offsets: np.ndarray) -> list[str]:
    data = blob.tobytes()
    return [
        data[a:b].decode("utf-8", "surrogatepass") for a, b in zip(offsets[:-1], offsets[1:], strict=True)
    ]


class _Features:
    """Exact keys and MinHash signatures of a part's kept documents, batch by batch."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg.dedup
        self.keys: list[np.ndarray] = []
        self.sigs: list[np.ndarray] = []
        self.ids: list[str] = []

    def add(self, docs: list[Document]) -> None:
        from dsv3.data.dedup import exact_keys, minhash_signatures

        texts = [d.text for d in docs]
        if self.cfg.exact:
            self.keys.append(exact_keys(texts))
        if self.cfg.near:
            self.sigs.append(minhash_signatures(texts, self.cfg.minhash))
        self.ids.extend(d.id for d in docs)

    def save(self, path: Path) -> None:
        blob, offsets = pack_strings(self.ids)
        keys = np.concatenate(self.keys) if self.keys else np.zeros(0, np.uint64)
        sigs = np.concatenate(self.sigs) if self.sigs else np.zeros((0, self.cfg.minhash.num_perm), np.uint32)
        save_npz_atomic(path, keys=keys, signatures=sigs, id_blob=blob, id_offsets=offsets)


def _finish(layout: Layout, stage: str, part: str, result: dict[str, Any]) -> dict[str, Any]:
    write_json_atomic(layout.marker(stage, part), result)
    return result


def filter_part(cfg: PipelineConfig, part: Part, layout: Layout) -> dict[str, Any]:
    """Read one part and run the steps; write the kept documents (and dedup features)."""
    start = time.perf_counter()
    steps = build_steps(cfg)
    read_name, *names = step_dirs(cfg)[: len(steps) + 1]
    read_stats = StepStats()
    read_rejects = Rejects(layout.rejects(read_name, part.name), samples=None)  # every bad record in full
    for name, step in zip(names, steps, strict=True):
        step.rejects = Rejects(layout.rejects(name, part.name), cfg.rejects_samples)
    docs: Iterable[Document] = read_part(part, cfg.inputs[part.input], read_stats, read_rejects)
    for step in steps:
        docs = step.run(docs)
    dedup = cfg.dedup is not None
    writer = (
        JsonlZstWriter(layout.filtered(part.name))
        if dedup
        else open_writer(layout.documents(part.name), cfg.output_format)
    )
    features = _Features(cfg) if dedup else None
    sinks = [read_rejects, *(s.rejects for s in steps)]
    try:
        for batch in batched(docs, cfg.dedup.batch_size if dedup else 1024):
            for doc in batch:
                writer.write({**doc.record(), "source": doc.source} if dedup else doc.record())
            if features is not None:
                features.add(batch)
        if features is not None:
            features.save(layout.features(part.name))
        writer.close()
        for sink in sinks:
            sink.close()
    except BaseException:
        writer.abort()
        for sink in sinks:
            sink.abort()
        raise
    stats = {
        read_name: read_stats.to_dict(),
        **{n: s.stats.to_dict() for n, s in zip(names, steps, strict=True)},
    }
    last = steps[-1].stats if steps else read_stats
    return _finish(
        layout,
        "filter",
        part.name,
        {
            "part": part.name,
            "source": part.path,
            "steps": stats,
            "docs_in": read_stats.docs_in,
            "bytes_in": read_stats.bytes_in,
            "docs_out": last.docs_out,
            "bytes_out": last.bytes_out,
            "seconds": round(time.perf_counter() - start, 4),
        },
    )


class _KeepClustered(Step):
    """Drops the documents the global clustering marked, naming the document each duplicates."""

    type = "dedup"

    def __init__(self, removed: dict[int, tuple[str, str]]):
        super().__init__()
        self.removed = removed
        self.index = -1

    def process(self, doc: Document) -> Document | tuple[str, dict[str, Any]]:
        self.index += 1
        hit = self.removed.get(self.index)
        if hit is None:
            return doc
        reason, original = hit
        return reason, {"duplicate_of": original}


def dedup_part(cfg: PipelineConfig, part: Part, layout: Layout) -> dict[str, Any]:
    """Write the part's documents that survived global dedup; the rest go to rejects."""
    start = time.perf_counter()
    removed = {
        i: (reason, original) for i, reason, original in json.loads(layout.decisions(part.name).read_text())
    }
    step = _KeepClustered(removed)
    name = step_dirs(cfg)[-1]
    step.rejects = Rejects(layout.rejects(name, part.name), cfg.rejects_samples)
    writer = open_writer(layout.documents(part.name), cfg.output_format)
    try:
        for doc in step.run(iter_documents(layout.filtered(part.name))):
            writer.write(doc.record())
        writer.close()
        step.rejects.close()
    except BaseException:
        writer.abort()
        step.rejects.abort()
        raise
    return _finish(
        layout,
        "dedup",
        part.name,
        {
            "part": part.name,
            "steps": {name: step.stats.to_dict()},
            "docs_in": step.stats.docs_in,
            "bytes_in": step.stats.bytes_in,
            "docs_out": step.stats.docs_out,
            "bytes_out": step.stats.bytes_out,
            "seconds": round(time.perf_counter() - start, 4),
        },
    )


def encode_part(cfg: PipelineConfig, part: Part, layout: Layout, tokenizer_file: str) -> dict[str, Any]:
    """Token ids (uint32, no special tokens) of the part's kept documents, streamed to disk."""
    from dsv3.data.tokenizer import encode_texts, load_tokenizer

    start = time.perf_counter()
    tokenizer = load_tokenizer(tokenizer_file)
    lengths: list[int] = []
    ids: list[str] = []
    n_bytes = 0
    tokens_path, index_path = layout.tokens(part.name)
    with atomic_open(tokens_path) as f:
        for batch in batched(iter_documents(layout.documents(part.name)), cfg.tokenize.batch_size):
            texts = [d.text for d in batch]
            for doc, arr in zip(batch, encode_texts(tokenizer, texts), strict=True):
                arr.astype(np.uint32, copy=False).tofile(f)
                lengths.append(len(arr))
                ids.append(doc.id)
            n_bytes += sum(map(utf8_len, texts))
    blob, offsets = pack_strings(ids)
    save_npz_atomic(index_path, lengths=np.asarray(lengths, dtype=np.int64), id_blob=blob, id_offsets=offsets)
    return _finish(
        layout,
        "encode",
        part.name,
        {
            "part": part.name,
            "docs": len(lengths),
            "tokens": int(sum(lengths)),
            "bytes": n_bytes,
            "docs_in": len(lengths),
            "bytes_in": n_bytes,
            "seconds": round(time.perf_counter() - start, 4),
        },
    )


def token_documents(parts: list[Part], layout: Layout) -> Iterator[tuple[str, np.ndarray]]:
    """(id, token ids) of every kept document, part by part, memory-mapped."""
    for part in parts:
        tokens_path, index_path = layout.tokens(part.name)
        with np.load(index_path) as index:
            lengths = index["lengths"]
            ids = unpack_strings(index["id_blob"], index["id_offsets"])
        if tokens_path.stat().st_size == 0:
            tokens = np.zeros(0, dtype=np.uint32)
        else:
            tokens = np.memmap(tokens_path, dtype=np.uint32, mode="r")
        ends = np.cumsum(lengths)
        for doc_id, a, b in zip(ids, ends - lengths, ends, strict=True):
            yield doc_id, np.asarray(tokens[a:b])
