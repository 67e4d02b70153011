"""A real local corpus: the Python standard library that ships with the interpreter.

Every machine that runs dsv3 has it, so benchmarks, tests and the demo get ~100k real documents
of code and English prose without a download. Documents are dicts `{"id", "text", "meta"}`:

- code (`meta.kind == "code"`): every `.py` file under `sysconfig.get_paths()["stdlib"]`
  (site-packages and `pydoc_data/topics.py` excluded) is cut with `ast` into units that tile the
  file: module-level statement runs (the first one carries the module docstring and imports),
  top-level functions, and classes split further into their statement runs, methods and nested
  classes. A unit longer than `max_lines` (default 20) is cut between statements into pieces of
  at most `max_lines` lines (a single longer statement stays whole). id: `path:first_line`.
- prose (`meta.kind == "prose"`): module/class/function docstrings (`path:line:docstring`),
  blocks of consecutive full-line comments with at least `MIN_COMMENT_WORDS` words
  (`path:line:comment`), and the sections of the language reference bundled in
  `pydoc_data/topics.py` (`pydoc_data/topics.py:<topic>:<piece>`). Prose longer than `max_lines`
  is cut at paragraph starts (ids then end in `:<piece>`).

On CPython 3.11 this gives 108k documents (73k code, 35k prose, 33 MB of text); the cut at 20
lines is what takes it past 100k, and is also about the size of one idea in code.

`meta` holds `path` (relative to the stdlib root, POSIX), `kind`, `unit` (module, function,
class, method, docstring, comment, topic), `name` (qualified name or topic) and `lines`
(first, last; 1-based, inclusive; absent for topics). Order is deterministic: files sorted by
path, code units then prose units in line order, then topics. Files that do not parse with this
interpreter (deliberately broken test inputs, Python 2 fixtures) are skipped and logged.

Public API: `stdlib_root()`, `iter_stdlib_documents(kind, limit, root, max_lines)`,
`write_jsonl_zst(docs, path) -> int`.
"""

from __future__ import annotations

import ast
import io
import itertools
import logging
import re
import sysconfig
import textwrap
import tokenize
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from dsv3.data.writers import JsonlZstWriter

__all__ = ["Kind", "MIN_COMMENT_WORDS", "stdlib_root", "iter_stdlib_documents", "write_jsonl_zst"]

log = logging.getLogger(__name__)

Kind = Literal["code", "prose", "all"]
MIN_COMMENT_WORDS = 6  # shorter comment blocks are labels ("# XXX", "# helpers"), not prose
TOPICS_PATH = "pydoc_data/topics.py"
_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_FUNCS = (ast.FunctionDef, ast.AsyncFunctionDef)
# A reST section title: a line underlined with a run of one punctuation character.
_SECTION_TITLE = re.compile(r"^(?=\S)(.+)\n([*=\-^~])\2{2,}[ \t]*$", re.M)


def stdlib_root() -> Path:
    """The standard library directory of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def _source_files(root: Path) -> list[Path]:
    files = [
        p
        for p in root.rglob("*.py")
        if not {"site-packages", "dist-packages", "__pycache__"} & set(p.relative_to(root).parts)
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _start(node: ast.stmt) -> int:
    decorators = getattr(node, "decorator_list", None)
    return min([node.lineno, *(d.lineno for d in decorators)]) if decorators else node.lineno


def _doc(rel: str, kind: str, unit: str, name: str, first: int, last: int, text: str,
         suffix: str = "") -> dict:
    return {
        "id": f"{rel}:{first}{suffix}",
        "text": text,
        "meta": {"path": rel, "kind": kind, "unit": unit, "name": name, "lines": [first, last]},
    }


def _pack(first: int, last: int, cuts: Iterable[int], max_lines: int) -> list[tuple[int, int]]:
    """Greedily group lines first..last into pieces of at most max_lines, cutting only at `cuts`.

    A stretch between two cuts longer than max_lines stays whole: cutting inside a statement or a
    paragraph would make documents nobody writes.
    """
    bounds = sorted(c for c in set(cuts) if first < c <= last)
    pieces, begin = [], first
    for i, cut in enumerate(bounds):
        end_if_kept = (bounds[i + 1] - 1) if i + 1 < len(bounds) else last
        if end_if_kept - begin + 1 > max_lines:
            pieces.append((begin, cut - 1))
            begin = cut
    pieces.append((begin, last))
    return pieces


def _scope_name(scope: str) -> str:
    return scope.rstrip(".") or "<module>"


class _CodeSplitter:
    """Cuts a parsed file into code units that tile its lines (nothing lost, nothing twice)."""

    def __init__(self, rel: str, lines: list[str], max_lines: int):
        self.rel, self.lines, self.max_lines = rel, lines, max_lines

    def _spans(self, body: list[ast.stmt], first: int, last: int, scope: str, in_class: bool):
        """Yield (first, last, unit, name) for a container body spanning lines first..last."""
        # Units start at each definition and at each run of other statements; the first unit is
        # widened to the container's first line so a header never stands alone.
        groups: list[list[ast.stmt]] = []
        for stmt in body:
            if isinstance(stmt, _DEFS) or not groups or isinstance(groups[-1][0], _DEFS):
                groups.append([stmt])
            else:
                groups[-1].append(stmt)
        if not groups:  # a module of comments only
            yield first, last, "module", _scope_name(scope)
            return
        starts = [first] + [_start(g[0]) for g in groups[1:]]
        for i, (group, begin) in enumerate(zip(groups, starts, strict=True)):
            end = starts[i + 1] - 1 if i + 1 < len(starts) else last
            node = group[0]
            if isinstance(node, ast.ClassDef):
                yield from self._spans(node.body, begin, end, f"{scope}{node.name}.", in_class=True)
                continue
            if isinstance(node, _FUNCS):  # cut only between the statements of its body
                unit, name, cuts = "method" if in_class else "function", f"{scope}{node.name}", node.body[1:]
            else:
                unit, name, cuts = "class" if in_class else "module", _scope_name(scope), group[1:]
            for a, b in _pack(begin, end, (_start(s) for s in cuts), self.max_lines):
                yield a, b, unit, name

    def documents(self, tree: ast.Module) -> Iterator[dict]:
        for first, last, unit, name in self._spans(tree.body, 1, len(self.lines), "", in_class=False):
            text = textwrap.dedent("".join(self.lines[first - 1 : last])).strip("\n")
            if text.strip():
                yield _doc(self.rel, "code", unit, name, first, last, text)


def _paragraph_pieces(text: str, max_lines: int) -> list[str]:
    """Cut prose longer than max_lines at paragraph starts (a line after a blank line)."""
    lines = text.split("\n")
    if len(lines) <= max_lines:
        return [text]
    cuts = [i + 1 for i in range(1, len(lines)) if not lines[i - 1].strip() and lines[i].strip()]
    pieces = ("\n".join(lines[a - 1 : b]).strip() for a, b in _pack(1, len(lines), cuts, max_lines))
    return [p for p in pieces if p]


def _prose(rel: str, unit: str, name: str, first: int, last: int, text: str, max_lines: int):
    pieces = _paragraph_pieces(text, max_lines)
    for k, piece in enumerate(pieces):
        suffix = f":{unit}" if len(pieces) == 1 else f":{unit}:{k}"
        yield (first, k), _doc(rel, "prose", unit, name, first, last, piece, suffix)


def _docstrings(rel: str, tree: ast.Module, max_lines: int) -> Iterator[tuple[tuple[int, int], dict]]:
    stack: list[tuple[ast.AST, str]] = [(tree, "")]
    while stack:
        node, scope = stack.pop()
        if isinstance(node, (ast.Module, *_DEFS)):
            doc = ast.get_docstring(node, clean=True)
            if doc and doc.strip():
                expr, name = node.body[0], _scope_name(scope)
                yield from _prose(rel, "docstring", name, expr.lineno, expr.end_lineno, doc, max_lines)
        for child in ast.iter_child_nodes(node):
            stack.append((child, f"{scope}{child.name}." if isinstance(child, _DEFS) else scope))


def _comment_blocks(rel: str, source: str, max_lines: int) -> Iterator[tuple[tuple[int, int], dict]]:
    """Runs of full-line comments on consecutive lines (tokenize, so `#` inside strings is not one)."""
    blocks: list[list[tuple[int, str]]] = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT or tok.line[: tok.start[1]].strip():
            continue  # a trailing comment belongs to its code line
        row = tok.start[0]
        if row == 1 and tok.string.startswith("#!"):
            continue
        if not blocks or row != blocks[-1][-1][0] + 1:
            blocks.append([])
        blocks[-1].append((row, tok.string.lstrip("#").removeprefix(" ").rstrip()))
    for block in blocks:
        text = "\n".join(t for _, t in block).strip()
        if len(text.split()) >= MIN_COMMENT_WORDS:
            yield from _prose(rel, "comment", "", block[0][0], block[-1][0], text, max_lines)


def _file_documents(root: Path, path: Path, kind: Kind, max_lines: int) -> Iterator[dict]:
    rel = path.relative_to(root).as_posix()
    try:
        with tokenize.open(path) as f:  # honours PEP 263 coding cookies
            source = f.read()
        with warnings.catch_warnings():  # e.g. invalid escapes in the test suite: not ours to fix
            warnings.simplefilter("ignore")
            tree = ast.parse(source, filename=rel)
    except (SyntaxError, UnicodeDecodeError, ValueError) as e:
        log.debug("skipping %s: %s", rel, e)
        return
    if kind in ("code", "all") and rel != TOPICS_PATH:
        yield from _CodeSplitter(rel, source.splitlines(keepends=True), max_lines).documents(tree)
    if kind in ("prose", "all"):
        prose = list(_docstrings(rel, tree, max_lines))
        try:
            prose += list(_comment_blocks(rel, source, max_lines))
        except (tokenize.TokenError, SyntaxError) as e:
            log.debug("no comments from %s: %s", rel, e)
        yield from (doc for _, doc in sorted(prose, key=lambda item: item[0]))


def _topic_documents(root: Path, max_lines: int) -> Iterator[dict]:
    """Sections of the language reference that `help()` shows, bundled as `pydoc_data.topics`."""
    path = root / TOPICS_PATH
    if not path.is_file():
        log.warning("no %s under %s: no reference topics in the corpus", TOPICS_PATH, root)
        return
    topics: dict[str, str] = {}
    for stmt in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(stmt, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in stmt.targets):
            topics = ast.literal_eval(stmt.value)
    for topic in sorted(topics):
        text = topics[topic]
        cuts = sorted({0, *(m.start() for m in _SECTION_TITLE.finditer(text))}) + [len(text)]
        sections = (text[a:b].strip() for a, b in zip(cuts, cuts[1:], strict=False))
        pieces = [p for section in sections if section for p in _paragraph_pieces(section, max_lines)]
        for k, piece in enumerate(pieces):
            yield {
                "id": f"{TOPICS_PATH}:{topic}:{k}",
                "text": piece,
                "meta": {"path": TOPICS_PATH, "kind": "prose", "unit": "topic", "name": topic},
            }


def iter_stdlib_documents(
    kind: Kind = "all", limit: int | None = None, root: Path | str | None = None, max_lines: int = 20
) -> Iterator[dict]:
    """Yield the standard library as documents, in a deterministic order (see the module doc)."""
    if kind not in ("code", "prose", "all"):
        raise ValueError(f"kind must be 'code', 'prose' or 'all', got {kind!r}")
    if max_lines < 1:
        raise ValueError(f"max_lines must be positive, got {max_lines}")
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"standard library directory not found: {root}")
    files = _source_files(root)
    docs = itertools.chain.from_iterable(_file_documents(root, p, kind, max_lines) for p in files)
    if kind in ("prose", "all"):
        docs = itertools.chain(docs, _topic_documents(root, max_lines))
    return itertools.islice(docs, limit) if limit is not None else docs


def write_jsonl_zst(docs: Iterable[dict[str, Any]], path: Path | str, level: int = 3) -> int:
    """Write documents as zstd-compressed JSON lines, atomically; return how many were written."""
    writer = JsonlZstWriter(path, level)
    try:
        for doc in docs:
            writer.write(doc)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return writer.count
