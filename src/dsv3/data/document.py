"""The document that flows through the pipeline, and the step protocol every stage follows.

As in datatrove, a step is a small object with one method, `run(docs) -> docs`: it takes
documents and yields the ones it keeps (possibly rewritten), counting documents and bytes in
and out, why it removed each document, and handing every removed one to its `Rejects` sink.
Subclasses implement `process(doc)`, which returns the kept document or the removal reason.

Public API: `Document`, `StepParams`, `StepStats`, `Rejects`, `Step`, `utf8_len`.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Document", "StepParams", "StepStats", "Rejects", "Step", "utf8_len"]

log = logging.getLogger(__name__)


def utf8_len(text: str) -> int:
    """Size of a text in UTF-8 bytes (lone surrogates from bad inputs count as 3, never raise)."""
    return len(text.encode("utf-8", "surrogatepass"))


@dataclass(slots=True)
class Document:
    """One record: its `id` (the input's id field, or the file path of a source tree), the text,
    the input's other fields in `meta`, and `source` ("file:line") for logs and rejects."""

    id: str
    text: str
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def record(self) -> dict[str, Any]:
        """The output record: what is written for a kept document."""
        return {"id": self.id, "text": self.text, "meta": self.meta}

    def lookup(self, key: str) -> Any:
        """The value at a dotted key ("id", "meta.kind", "meta.lang.code"); None when absent."""
        head, _, rest = key.partition(".")
        node: Any = {"id": self.id, "text": self.text, "meta": self.meta, "source": self.source}.get(head)
        for part in rest.split(".") if rest else ():
            node = node.get(part) if isinstance(node, dict) else None
        return node


class StepParams(BaseModel):
    """Parameters every step accepts; each step extends this with its own thresholds."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    when: dict[str, Any] | None = Field(
        default=None,
        description="apply only to documents whose dotted key equals the value (or one of a list), "
        "e.g. {meta.kind: prose}; others pass through untouched",
    )


@dataclass
class StepStats:
    """What one step saw and did; summed over parts and workers with `merge`."""

    docs_in: int = 0
    docs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    modified: int = 0
    passed_through: int = 0  # not selected by `when`
    seconds: float = 0.0
    removed: collections.Counter = field(default_factory=collections.Counter)

    def merge(self, other: StepStats) -> StepStats:
        for name in ("docs_in", "docs_out", "bytes_in", "bytes_out", "modified", "passed_through", "seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.removed.update(other.removed)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "docs_in": self.docs_in,
            "docs_out": self.docs_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "modified": self.modified,
            "passed_through": self.passed_through,
            "seconds": round(self.seconds, 4),
            "removed": dict(self.removed.most_common()),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepStats:
        return cls(**{**d, "removed": collections.Counter(d.get("removed", {}))})


class Rejects:
    """Where a step's removed documents go.

    Every removal is recorded (id, reason, source and any extra fields) so nothing is dropped
    silently; the text and meta are kept only for the first `samples`, so the rejects folder
    stays small. With a `path` the records stream to a jsonl.zst file (atomic on `close`); without
    one they are kept in `records` (bounded by `samples`), which tests and library users read.
    `samples=None` keeps the text of every removed document.
    """

    def __init__(self, path: Path | None = None, samples: int | None = 100):
        self.path, self.samples = path, samples
        self.count = 0
        self.records: list[dict[str, Any]] = []
        self._writer = None

    def add(self, doc: Document, reason: str, **extra: Any) -> None:
        rec: dict[str, Any] = {"id": doc.id, "reason": reason, "source": doc.source, **extra}
        sampled = self.samples is None or self.count < self.samples
        if sampled:
            rec["text"], rec["meta"] = doc.text, doc.meta
        self.count += 1
        if self.path is None:
            if sampled:
                self.records.append(rec)
            return
        if self._writer is None:
            from dsv3.data.writers import JsonlZstWriter

            self._writer = JsonlZstWriter(self.path)
        self._writer.write(rec)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None


class Step:
    """One pipeline stage. Subclasses set `type` and `Params` and implement `process`."""

    type: ClassVar[str] = "step"
    Params: ClassVar[type[StepParams]] = StepParams

    def __init__(self, params: StepParams | None = None):
        self.params = params if params is not None else self.Params()
        self.stats = StepStats()
        self.rejects = Rejects()
        when = self.params.when or {}
        self._when = {k: (set(v) if isinstance(v, list) else {v}) for k, v in when.items()}

    def process(self, doc: Document) -> Document | str | tuple[str, dict[str, Any]]:
        """The kept document (the same object, or a rewritten one), or the reason it is removed
        (optionally with extra fields for its rejects record)."""
        raise NotImplementedError

    def selects(self, doc: Document) -> bool:
        return all(_hashable(doc.lookup(k)) in allowed for k, allowed in self._when.items())

    def run(self, docs: Iterable[Document]) -> Iterator[Document]:
        """Process a stream of documents, yielding the kept ones and counting everything."""
        stats, clock = self.stats, time.perf_counter
        for doc in docs:
            size = utf8_len(doc.text)
            stats.docs_in += 1
            stats.bytes_in += size
            if self._when and not self.selects(doc):
                stats.passed_through += 1
                stats.docs_out += 1
                stats.bytes_out += size
                yield doc
                continue
            text = doc.text
            start = clock()
            result = self.process(doc)
            stats.seconds += clock() - start
            if not isinstance(result, Document):
                reason, extra = (result, {}) if isinstance(result, str) else result
                stats.removed[reason] += 1
                self.rejects.add(doc, reason, **extra)
                continue
            if result.text is not text:
                if result.text != text:
                    stats.modified += 1
                size = utf8_len(result.text)
            stats.docs_out += 1
            stats.bytes_out += size
            yield result


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value if not isinstance(value, dict) else None
