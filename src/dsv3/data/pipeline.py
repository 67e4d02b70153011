"""`dsv3 preprocess`: raw documents in, clean deduplicated documents (and token shards) out.

Stages, each resumable (a rerun skips what `.state/` records as finished):

1. filter (workers, per part): read -> clean/filter steps -> kept documents; with dedup, also
   the exact keys and MinHash signatures of the kept documents.
2. clusters (main process): exact-key and LSH candidate pairs over all parts, joined into
   clusters; the first document of each cluster in input order is kept. Memory is bounded by
   the signatures (num_perm * 4 bytes per document), never by the texts.
3. dedup (workers): each part re-streamed, writing only kept documents; removed ones go to the
   rejects folder with the id of the document they duplicate.
4. tokenizer (main): the given tokenizer.json, or one trained on the kept documents.
5. encode (workers) and shards (main): token ids, EOS appended, Megatron .bin/.idx train/valid.

Output folder: documents/, rejects/<NN_step>/, report.json, the shards, and .state/ (markers).

Public API: `Progress`, `run_pipeline(cfg, progress) -> report dict`.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import multiprocessing
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from dsv3.config import ConfigError
from dsv3.data.document import StepStats
from dsv3.data.pipeline_config import PipelineConfig, build_steps
from dsv3.data.readers import Part, iter_documents, plan_parts
from dsv3.data.stages import (
    STATE,
    WORK,
    Layout,
    dedup_part,
    encode_part,
    filter_part,
    step_dirs,
    token_documents,
    unpack_strings,
)
from dsv3.io import sweep_temps, write_json_atomic

__all__ = ["Progress", "run_pipeline"]

log = logging.getLogger(__name__)

OWNED = ("documents", "rejects", "report.json", STATE, WORK)  # what the pipeline writes under its output

# progress(stage, done, total, documents): called when a stage starts and after each unit of it.
Progress = Callable[[str, int, int, int], None]


def _no_progress(stage: str, done: int, total: int, docs: int) -> None:
    pass


def _init_worker(level: int) -> None:
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


class _Runner:
    """Runs per-part jobs inline (1 worker) or in a spawn process pool, reporting progress."""

    def __init__(self, workers: int):
        self.workers = workers
        self.pool: cf.ProcessPoolExecutor | None = None

    def __enter__(self) -> _Runner:
        if self.workers > 1:
            self.pool = cf.ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(logging.getLogger().getEffectiveLevel(),),
            )
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def map(self, fn: Callable[..., dict], jobs: list[tuple], on_done: Callable[[dict], None]) -> None:
        if self.pool is None or len(jobs) < 2:
            for job in jobs:
                on_done(fn(*job))
            return
        futures = [self.pool.submit(fn, *job) for job in jobs]
        try:
            for future in cf.as_completed(futures):
                on_done(future.result())
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _claim_output(root: Path, cfg: PipelineConfig, parts: list[Part]) -> bool:
    """Create the output folder, or check that it holds a run of this same config; True if resuming."""
    run_file = root / STATE / "run.json"
    run = {"config": cfg.fingerprint(), "parts": [asdict(p) for p in parts]}
    if run_file.is_file():
        old = _read_json(run_file)
        if old != json.loads(json.dumps(run)):
            changed = sorted(
                k
                for k in set(old["config"]) | set(run["config"])
                if old["config"].get(k) != run["config"].get(k)
            )
            what = ", ".join(changed) if changed else "the input files (their parts)"
            raise ConfigError(
                f"{root}: holds a run of a different pipeline (changed: {what}); "
                "remove it or choose another --output"
            )
        return True
    # Other files may share the folder (the demo keeps its raw corpus there); ours must not exist yet.
    taken = [name for name in OWNED if (root / name).exists()]
    if taken:
        raise ConfigError(
            f"{root}: already holds {', '.join(taken)} but no record of the run that wrote them "
            "(.state/run.json); choose another --output or remove them"
        )
    write_json_atomic(run_file, run)
    return False


def _sweep_temporaries(root: Path) -> None:
    """Half-written files of an interrupted run (their finished versions were never renamed in)."""
    for name in OWNED:
        sweep_temps(root / name, recursive=True)
    sweep_temps(root)


class _Run:
    """One invocation: runs each stage that `.state/` does not mark finished, and gathers the report."""

    def __init__(self, cfg: PipelineConfig, parts: list[Part], runner: _Runner, progress: Progress):
        self.cfg, self.parts, self.runner, self.progress = cfg, parts, runner, progress
        self.layout = Layout(Path(cfg.output), cfg.output_format)
        self.timings: dict[str, float] = {}
        self.work: dict[str, dict[str, int]] = {}  # what each per-part stage did in this invocation

    def per_part(
        self, stage: str, fn: Callable[..., dict], *extra: Any, docs_key: str = "docs_out"
    ) -> list[dict]:
        """`fn(cfg, part, layout, *extra)` on every unfinished part; the results of all parts, in order."""
        start, layout, parts = time.perf_counter(), self.layout, self.parts
        results = {
            p.name: _read_json(layout.marker(stage, p.name))
            for p in parts
            if layout.marker(stage, p.name).is_file()
        }
        docs = sum(r[docs_key] for r in results.values())
        self.progress(stage, len(results), len(parts), docs)

        work = self.work[stage] = {"parts": 0, "docs_in": 0, "bytes_in": 0, "tokens": 0}

        def done(result: dict) -> None:
            nonlocal docs
            results[result["part"]] = result
            docs += result[docs_key]
            for key in work:
                work[key] += 1 if key == "parts" else result.get(key, 0)
            self.progress(stage, len(results), len(parts), docs)

        todo = [(self.cfg, p, layout, *extra) for p in parts if p.name not in results]
        if todo:
            log.info("%s: %d of %d parts to do", stage, len(todo), len(parts))
        self.runner.map(fn, todo, done)
        self.timings[stage] = time.perf_counter() - start
        return [results[p.name] for p in parts]

    def once(self, stage: str, fn: Callable[[], dict], docs_key: str) -> dict:
        """A main-process stage, skipped when its marker exists (its result is the marker)."""
        start, marker = time.perf_counter(), self.layout.marker(stage)
        if marker.is_file():
            result = _read_json(marker)
        else:
            self.progress(stage, 0, 1, 0)
            result = fn()
            write_json_atomic(marker, result)
        self.progress(stage, 1, 1, result.get(docs_key, 0))
        self.timings[stage] = time.perf_counter() - start
        return result


def _find_duplicates(cfg: PipelineConfig, parts: list[Part], layout: Layout) -> dict[str, Any]:
    """Global clusters over every part's keys and signatures; writes each part's removal list.

    Peak memory: the signatures (preallocated, filled part by part) plus the ids.
    """
    from dsv3.data.dedup import cluster_labels, cluster_stats, exact_labels, keep_mask, lsh_candidate_pairs

    start, dcfg = time.perf_counter(), cfg.dedup
    counts = []
    for part in parts:
        with np.load(layout.features(part.name)) as z:
            counts.append(len(z["id_offsets"]) - 1)
    bounds = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    n = int(bounds[-1])
    keys = np.empty(n if dcfg.exact else 0, dtype=np.uint64)
    sigs = np.empty((n if dcfg.near else 0, dcfg.minhash.num_perm), dtype=np.uint32)
    ids: list[str] = []
    for k, part in enumerate(parts):
        with np.load(layout.features(part.name)) as z:
            if dcfg.exact:
                keys[bounds[k] : bounds[k + 1]] = z["keys"]
            if dcfg.near:
                sigs[bounds[k] : bounds[k + 1]] = z["signatures"]
            ids += unpack_strings(z["id_blob"], z["id_offsets"])
    pairs = [np.zeros((0, 2), dtype=np.int64)]
    if dcfg.exact:
        first = exact_labels(keys)
        copies = np.flatnonzero(first != np.arange(n))
        pairs.append(np.stack([first[copies], copies], axis=1))
    candidates = np.zeros((0, 2), dtype=np.int64)
    if dcfg.near:
        candidates = lsh_candidate_pairs(sigs, dcfg.minhash, cfg.workers)
    labels = cluster_labels(n, np.concatenate([*pairs, candidates]))
    removed = np.flatnonzero(~keep_mask(labels))
    # "exact" when the removed text equals (normalised) the kept one; otherwise it is a near copy
    exact = keys[removed] == keys[labels[removed]] if dcfg.exact else np.zeros(len(removed), dtype=bool)
    for k, part in enumerate(parts):  # one removal list per part, local indices: workers read their own
        lo, hi = np.searchsorted(removed, bounds[k : k + 2])
        rows = [
            [int(i - bounds[k]), "exact" if is_exact else "near", ids[labels[i]]]
            for i, is_exact in zip(removed[lo:hi], exact[lo:hi], strict=True)
        ]
        write_json_atomic(layout.decisions(part.name), rows)
    return {
        **cluster_stats(labels),
        "exact_removed": int(exact.sum()),
        "near_removed": int((~exact).sum()),
        "candidate_pairs": len(candidates),
        "seconds": round(time.perf_counter() - start, 4),
    }


def _any_document(parts: list[Part], layout: Layout) -> bool:
    return any(next(iter_documents(layout.documents(p.name)), None) is not None for p in parts)


def _prepare_tokenizer(cfg: PipelineConfig, parts: list[Part], layout: Layout, progress: Progress) -> dict:
    """The tokenizer file, trained first on the kept documents when it does not exist."""
    from dsv3.data.tokenizer import load_tokenizer, special_token_ids, train_tokenizer

    tcfg = cfg.tokenize
    file = tcfg.tokenizer_file
    info: dict[str, Any] = {"path": str(file), "trained": False}
    if not file.is_file():
        if tcfg.train is None:
            raise ConfigError(
                f"tokenize.tokenizer: {file}: no such file (give one, or set tokenize.train."
                "vocab_size to train it on the kept documents)"
            )
        if not _any_document(parts, layout):
            raise ConfigError(f"tokenize.train: no document survived the pipeline to train {file} on")
        start, used = time.perf_counter(), 0
        limit = tcfg.train.limit

        def texts():
            nonlocal used
            for part in parts:
                for doc in iter_documents(layout.documents(part.name)):
                    if limit is not None and used >= limit:
                        return
                    used += 1
                    if used % 1000 == 0:
                        progress("tokenizer", 0, 1, used)
                    yield doc.text

        train_tokenizer(texts(), tcfg.train.vocab_size, file.parent, min_frequency=tcfg.train.min_frequency)
        info.update(trained=True, documents=used, seconds=round(time.perf_counter() - start, 4))
    tokenizer = load_tokenizer(file)
    bos, eos, pad = special_token_ids(tokenizer)
    info.update(vocab_size=tokenizer.get_vocab_size(), bos=bos, eos=eos, pad=pad)
    return info


def _merge_steps(names: list[str], results: list[dict]) -> list[dict[str, Any]]:
    totals = {name: StepStats() for name in names}
    for result in results:
        for name, stats in result["steps"].items():
            totals[name].merge(StepStats.from_dict(stats))
    return [{"name": name, **totals[name].to_dict()} for name in names]


def run_pipeline(cfg: PipelineConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Run (or resume) the pipeline; returns the report, also written to `output/report.json`."""
    wall_start = time.perf_counter()
    build_steps(cfg)  # fail now, in one line, on a missing model file or package
    parts = plan_parts(cfg.inputs)
    root = Path(cfg.output)
    resumed = _claim_output(root, cfg, parts)
    _sweep_temporaries(root)
    report: dict[str, Any] = {
        "name": cfg.name,
        "output": str(root),
        "workers": cfg.workers,
        "parts": len(parts),
        "resumed": resumed,
    }
    with _Runner(cfg.workers) as runner:
        run = _Run(cfg, parts, runner, progress or _no_progress)
        results = final = run.per_part("filter", filter_part)
        if cfg.dedup is not None:
            report["dedup"] = run.once(
                "clusters", lambda: _find_duplicates(cfg, parts, run.layout), "documents"
            )
            final = run.per_part("dedup", dedup_part)
            results = results + final
        report["steps"] = _merge_steps(step_dirs(cfg), results)
        report["documents"] = {
            "count": sum(r["docs_out"] for r in final),
            "bytes": sum(r["bytes_out"] for r in final),
            "folder": str(root / "documents"),
            "format": cfg.output_format,
        }
        if cfg.tokenize is not None:
            tok = report["tokenizer"] = run.once(
                "tokenizer", lambda: _prepare_tokenizer(cfg, parts, run.layout, run.progress), "documents"
            )
            encoded = run.per_part("encode", encode_part, tok["path"], docs_key="docs")
            results = results + encoded
            report["encode"] = {key: sum(r[key] for r in encoded) for key in ("docs", "tokens", "bytes")}
            report["shards"] = run.once(
                "shards", lambda: _write_shards(cfg, parts, run.layout, tok), "documents"
            )
    report["throughput"] = _throughputs(run.timings, run.work)
    report["worker_seconds"] = round(sum(r["seconds"] for r in results), 3)
    report["wall_seconds"] = round(time.perf_counter() - wall_start, 3)
    write_json_atomic(root / "report.json", report)
    shutil.rmtree(root / WORK, ignore_errors=True)  # intermediates: every stage is finished
    return report


def _throughputs(timings: dict[str, float], work: dict[str, dict[str, int]]) -> dict[str, dict[str, Any]]:
    """Per stage: wall seconds of this invocation and, where it processed parts, docs and MB per second.

    Parts finished by an earlier invocation count for nothing here, so a resumed run reports the
    speed of what it did itself (the global clustering's seconds count as the dedup stage's).
    """
    out: dict[str, dict[str, Any]] = {}
    folded = {"dedup": "clusters"}
    for stage, seconds in timings.items():
        if stage in folded.values():
            continue
        entry: dict[str, Any] = {"seconds": round(seconds, 3)}
        done = work.get(stage)
        if done is not None:
            if stage in folded:
                entry["seconds"] = round(seconds + timings[folded[stage]], 3)
            if done["parts"]:
                wall = max(entry["seconds"], 1e-9)
                entry.update(
                    parts=done["parts"],
                    docs_per_s=round(done["docs_in"] / wall, 1),
                    mb_per_s=round(done["bytes_in"] / wall / 1e6, 3),
                )
                if done["tokens"]:
                    entry["tokens_per_s"] = round(done["tokens"] / wall, 1)
            else:
                entry["parts"] = 0  # all done by an earlier invocation
        out[stage] = entry
    return out


def _write_shards(cfg: PipelineConfig, parts: list[Part], layout: Layout, tok: dict) -> dict:
    from dsv3.data.shards import token_dtype, write_token_shards

    tcfg = cfg.tokenize
    out = Path(tcfg.output)
    out = out if out.is_absolute() else layout.root / out
    summary = write_token_shards(
        token_documents(parts, layout),
        out,
        valid_fraction=tcfg.valid_fraction,
        seed=tcfg.seed,
        eos_id=tok["eos"],
        max_tokens_per_shard=tcfg.max_tokens_per_shard,
        dtype=token_dtype(tok["vocab_size"]),
    )
    return {
        **summary,
        "folder": str(out),
        "documents": summary["train"]["documents"] + summary["valid"]["documents"],
    }
