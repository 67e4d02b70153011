"""MinHash signatures + LSH: dsv3 (numpy, all cores) against datasketch, same documents, same run.

Documents: the Python standard library cut into ~108k code and prose documents (dsv3.data.corpus).
Both systems see the same word 5-gram shingles (`dsv3.data.dedup.word_shingles` defines them for
datasketch), 112 permutations and 14 bands x 8 rows (`MinHashLSH(params=(14, 8))`), and neither
indexes documents without words. dsv3's time covers shingling, hashing, signatures over a
process pool and LSH pairing; datasketch's covers shingling, `MinHash.bulk`, the LSH inserts and
one query per document. Prints one JSON line per system, then one comparing them: the speed
ratio per core and the agreement of the two candidate-pair sets, then the agreement between two
datasketch seeds (two samplings of the same method), the yardstick for the pair agreement.

Per core is given two ways: `docs_per_s_per_core` divides throughput by the processes used (it
assumes each got a whole core, so it understates dsv3 on a shared machine), `docs_per_cpu_s` by
the CPU seconds actually consumed by this process and its worker pool.

    python benchmarks/dedup.py              # the full corpus
    python benchmarks/dedup.py --limit 5000 # a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import numpy as np
from datasketch import MinHash, MinHashLSH

from dsv3.data.corpus import iter_stdlib_documents
from dsv3.data.dedup import (
    MinHashConfig,
    default_workers,
    lsh_candidate_pairs,
    signatures_from_chunks,
    word_shingles,
)


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the worker pool)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _result(system: str, docs: int, cores: int, wall: float, cpu: float, pairs: int, **phases: float) -> dict:
    return {
        "system": system, "docs": docs, "cores": cores, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
        **{f"{phase}_s": round(seconds, 3) for phase, seconds in phases.items()},
        "docs_per_s": round(docs / wall, 1), "docs_per_s_per_core": round(docs / wall / cores, 1),
        "docs_per_cpu_s": round(docs / cpu, 1), "pairs": pairs,
    }


def run_dsv3(texts: list[str], cfg: MinHashConfig, workers: int, chunk: int) -> tuple[dict, set]:
    cpu, start = _cpu_seconds(), time.perf_counter()
    chunks = (texts[i : i + chunk] for i in range(0, len(texts), chunk))
    signatures = signatures_from_chunks(chunks, cfg, workers=workers)
    signed = time.perf_counter()
    pairs = lsh_candidate_pairs(signatures, cfg, workers)
    end = time.perf_counter()
    result = _result("dsv3", len(texts), workers, end - start, _cpu_seconds() - cpu, len(pairs),
                     signatures=signed - start, lsh=end - signed)
    return result, set(map(tuple, pairs.tolist()))


def run_datasketch(texts: list[str], cfg: MinHashConfig, seed: int) -> tuple[dict, set]:
    cpu, start = _cpu_seconds(), time.perf_counter()
    shingles = [word_shingles(t, cfg.ngram) for t in texts]
    shingled = time.perf_counter()
    keys = [i for i, s in enumerate(shingles) if s]  # documents without words are not indexed
    minhashes = MinHash.bulk([shingles[i] for i in keys], num_perm=cfg.num_perm, seed=seed)
    hashed = time.perf_counter()
    lsh = MinHashLSH(num_perm=cfg.num_perm, params=(cfg.bands, cfg.rows))
    with lsh.insertion_session() as session:
        for key, m in zip(keys, minhashes, strict=True):
            session.insert(key, m, check_duplication=False)
    pairs = {(min(i, j), max(i, j)) for i, m in zip(keys, minhashes, strict=True)
             for j in lsh.query(m) if j != i}
    end = time.perf_counter()
    result = _result("datasketch", len(texts), 1, end - start, _cpu_seconds() - cpu, len(pairs),
                     shingles=shingled - start, minhash=hashed - shingled, lsh=end - hashed)
    return {**result, "seed": seed}, pairs


def _true_jaccard(texts: list[str], pairs: set, ngram: int, sample: int = 2000) -> float | None:
    """Median exact shingle Jaccard over (a sample of) the pairs."""
    chosen = sorted(pairs)[:: max(1, len(pairs) // sample)]
    values = []
    for i, j in chosen:
        a, b = word_shingles(texts[i], ngram), word_shingles(texts[j], ngram)
        values.append(len(a & b) / len(a | b))
    return round(float(np.median(values)), 3) if values else None


def agreement(name: str, ours: set, theirs: set, texts: list[str], ngram: int) -> dict:
    """How far two candidate-pair sets agree, and how similar the pairs they disagree on really are."""
    both = ours & theirs
    return {
        "comparison": name, "pairs_a": len(ours), "pairs_b": len(theirs), "pairs_both": len(both),
        "pair_count_diff_pct": round(100 * (len(ours) - len(theirs)) / max(1, len(theirs)), 3),
        "pair_set_jaccard": round(len(both) / max(1, len(ours | theirs)), 5),
        "a_pairs_found_by_b": round(len(both) / max(1, len(ours)), 5),
        "b_pairs_found_by_a": round(len(both) / max(1, len(theirs)), 5),
        "true_jaccard_median_agreed": _true_jaccard(texts, both, ngram),
        "true_jaccard_median_disputed": _true_jaccard(texts, ours ^ theirs, ngram),
    }


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--limit", type=int, help="use the first N documents")
    parser.add_argument("--workers", type=int, default=default_workers(), help="dsv3 processes (all cores)")
    parser.add_argument("--chunk", type=int, default=2000, help="documents per dsv3 task")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the second datasketch run (another seed) that shows sampling disagreement")
    args = parser.parse_args()
    cfg = MinHashConfig()

    texts = [d["text"] for d in iter_stdlib_documents("all", limit=args.limit)]
    load = round(os.getloadavg()[0], 2)
    ours, our_pairs = run_dsv3(texts, cfg, args.workers, args.chunk)
    print(json.dumps({**ours, "loadavg_1m_before": load}), flush=True)
    load = round(os.getloadavg()[0], 2)
    theirs, their_pairs = run_datasketch(texts, cfg, cfg.seed)
    print(json.dumps({**theirs, "loadavg_1m_before": load}), flush=True)

    summary = agreement("dsv3 vs datasketch", our_pairs, their_pairs, texts, cfg.ngram)
    summary.update({
        "speedup_per_core": round(ours["docs_per_s_per_core"] / theirs["docs_per_s_per_core"], 2),
        "speedup_per_cpu_s": round(ours["docs_per_cpu_s"] / theirs["docs_per_cpu_s"], 2),
        "speedup_wall": round(theirs["wall_s"] / ours["wall_s"], 2),
        "lsh_midpoint_jaccard": round(cfg.midpoint, 3),
    })
    print(json.dumps(summary), flush=True)
    if not args.no_baseline:  # two samplings of the same method disagree near the LSH threshold too
        _, other_pairs = run_datasketch(texts, cfg, cfg.seed + 1)
        print(json.dumps(agreement(f"datasketch seed {cfg.seed + 1} vs seed {cfg.seed}", other_pairs,
                                   their_pairs, texts, cfg.ngram)), flush=True)


if __name__ == "__main__":
    main()
