"""Exact and near-duplicate detection as pure functions over numpy arrays.

The pipeline runner calls these from its workers; nothing here holds documents longer than one
chunk, so memory is bounded by the signatures (num_perm * 4 bytes per document).

Exact duplicates: `exact_keys` hashes `normalize_text(t)` (Unicode NFC, lowercase, every run of
whitespace collapsed to one space, ends stripped) with xxh3_64.

Near duplicates (MinHash LSH):
- words are maximal runs of ASCII letters, digits, `_` or any non-ASCII character, taken from the
  NFC-normalised, lowercased text (`word_shingles` is the plain-Python definition; the numpy path
  produces the same sets); shingles are word n-grams (`ngram`, default 5); a document with fewer
  than `ngram` words has one shingle of all its words; one with no words has none and is never a
  duplicate of anything.
- each shingle is hashed to 32 bits in bulk (a vectorised polynomial hash of the word bytes, then
  a position-weighted sum over the n-gram, both finished with the MurmurHash3 64-bit finaliser).
- the permutations are those of datasketch >= 2.0's default "affine32" scheme: the MurmurHash3
  32-bit finaliser, then h -> a*h + b mod 2^32 with odd `a`, with `a`, `b` drawn exactly as
  datasketch draws them from `seed`. Given the same 32-bit shingle hashes, our signatures are bit
  for bit datasketch's. The only difference from datasketch is the shingle hash (datasketch: the
  first 4 bytes of SHA-1), so both estimate the same Jaccard similarity with the same error
  (std sqrt(J(1-J)/num_perm)) but not with identical samples. (datasketch's pre-2.0 "legacy"
  scheme, (a*h + b) mod (2^61 - 1) truncated to 32 bits, is slower and biased on large sets.)
- LSH: `bands` x `rows` = `num_perm`; two documents are candidates when all `rows` values of at
  least one band agree, which happens with probability 1 - (1 - J^rows)^bands. For the default
  14 x 8 that is 5% at J=0.5, 21% at 0.6, 56% at 0.7, 92% at 0.8 and 99.96% at 0.9; the 50% point
  is J = 0.685 (`MinHashConfig.midpoint`; the usual shortcut (1/b)^(1/r) gives 0.719). Setting
  `threshold` additionally drops candidates whose estimated Jaccard (the fraction of equal
  signature values) is below it: choose it near the midpoint (0.7) to cut the S-curve's tail of
  chance collisions; the default (None) keeps every candidate, like datasketch's MinHashLSH.
- candidate pairs are every pair sharing a band, as datasketch's `query` returns them, except in
  buckets larger than `max_bucket_size`, which are linked as a star from their first document
  (same clusters, bounded output). Documents with identical signatures are grouped before
  banding, so exact duplicates are paired once instead of once per band.
- clusters: candidate pairs joined by union-find; each document's label is the smallest index
  in its cluster. Keep rule: the first document in input order of each cluster is kept, the
  rest are removed. Signatures depend only on a document's text, so labels and the kept set do
  not depend on chunking or worker count.

Public API: `MinHashConfig`, `EMPTY`, `normalize_text`, `exact_keys`, `exact_labels`,
`word_shingles`, `shingle_hashes`, `permutations`, `minhash_signatures`, `default_workers`,
`signatures_from_chunks`, `lsh_candidate_pairs`, `estimated_jaccard`, `cluster_labels`,
`keep_mask`, `cluster_stats`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import logging
import multiprocessing
import os
import re
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np
import xxhash
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "MinHashConfig",
    "EMPTY",
    "normalize_text",
    "exact_keys",
    "exact_labels",
    "word_shingles",
    "shingle_hashes",
    "permutations",
    "minhash_signatures",
    "default_workers",
    "signatures_from_chunks",
    "lsh_candidate_pairs",
    "estimated_jaccard",
    "cluster_labels",
    "keep_mask",
    "cluster_stats",
]

log = logging.getLogger(__name__)

EMPTY = np.uint32(0xFFFFFFFF)  # the signature value of a document without shingles
_WORD = re.compile(rb"[0-9A-Za-z_\x80-\xff]+")
_WORD_BYTE = np.zeros(256, dtype=bool)
for _b in (*range(ord("0"), ord("9") + 1), *range(ord("A"), ord("Z") + 1), *range(ord("a"), ord("z") + 1)):
    _WORD_BYTE[_b] = True
_WORD_BYTE[ord("_")] = True
_WORD_BYTE[0x80:] = True
_U64 = np.uint64
_POLY = 0x9E3779B97F4A7C15  # odd, so it has an inverse mod 2^64
_POLY_INV = pow(_POLY, -1, 1 << 64)
# Position weights of the words inside an n-gram: fixed random odd 64-bit constants (RandomState's
# stream is frozen across numpy versions, so shingle hashes are reproducible).
_MAX_NGRAM = 16
_NGRAM_WEIGHTS = np.random.RandomState(0x5EED).randint(0, 1 << 63, _MAX_NGRAM, dtype=_U64) * _U64(2) + _U64(1)
_BLOCK_ROWS = 2048  # shingles per permutation block: block * num_perm * 4 bytes stays in cache


class MinHashConfig(BaseModel):
    """MinHash LSH parameters; the defaults (112 = 14 x 8) find 92% of pairs at J=0.8, half at 0.685."""

    model_config = ConfigDict(extra="forbid")

    ngram: int = Field(default=5, ge=1, le=_MAX_NGRAM, description="words per shingle")
    num_perm: int = Field(default=112, ge=1, description="signature length")
    bands: int = Field(default=14, ge=1)
    rows: int = Field(default=8, ge=1, description="signature values per band")
    seed: int = Field(default=1, ge=0, lt=2**32, description="draws the permutations (datasketch's seed)")
    threshold: float | None = Field(
        default=None, gt=0, le=1, description="drop candidate pairs whose estimated Jaccard is lower"
    )
    max_bucket_size: int = Field(
        default=1000, ge=2, description="a larger LSH bucket is linked as a star, not as all its pairs"
    )

    @model_validator(mode="after")
    def _check_bands(self) -> MinHashConfig:
        if self.bands * self.rows != self.num_perm:
            raise ValueError(f"bands * rows must equal num_perm, got {self.bands} * {self.rows} = "
                             f"{self.bands * self.rows} != {self.num_perm}")
        return self

    def candidate_probability(self, jaccard: float | np.ndarray) -> float | np.ndarray:
        """Probability that a pair with this Jaccard similarity shares at least one band."""
        return 1.0 - (1.0 - np.asarray(jaccard, dtype=float) ** self.rows) ** self.bands

    @property
    def midpoint(self) -> float:
        """The Jaccard similarity that becomes a candidate with probability 1/2."""
        return float((1.0 - 0.5 ** (1.0 / self.bands)) ** (1.0 / self.rows))


# ------------------------------------------------------------------------------------------------
# Exact duplicates
# ------------------------------------------------------------------------------------------------


def normalize_text(text: str) -> str:
    """NFC, lowercase, whitespace runs collapsed to one space: what exact dedup compares."""
    return " ".join(unicodedata.normalize("NFC", text).lower().split())


def exact_keys(texts: Iterable[str], normalize: bool = True) -> np.ndarray:
    """xxh3_64 of each (normalised) text, as uint64."""
    digest = xxhash.xxh3_64_intdigest
    norm = normalize_text if normalize else (lambda t: t)
    return np.fromiter((digest(norm(t).encode("utf-8", "surrogatepass")) for t in texts), dtype=_U64)


def exact_labels(keys: np.ndarray) -> np.ndarray:
    """For each document, the index of the first document with the same key."""
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    return first[inverse.reshape(-1)].astype(np.int64)


# ------------------------------------------------------------------------------------------------
# Shingles and signatures
# ------------------------------------------------------------------------------------------------


def _fmix64(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> _U64(33))
    x = x * _U64(0xFF51AFD7ED558CCD)
    x = x ^ (x >> _U64(33))
    x = x * _U64(0xC4CEB9FE1A85EC53)
    return x ^ (x >> _U64(33))


def _fmix32(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> np.uint32(13))
    x = x * np.uint32(0xC2B2AE35)
    return x ^ (x >> np.uint32(16))


def _normalize_for_shingles(text: str) -> bytes:
    return unicodedata.normalize("NFC", text).lower().encode("utf-8", "surrogatepass")


def word_shingles(text: str, ngram: int = 5) -> set[bytes]:
    """The shingle set of one text, in plain Python: the definition the numpy path implements."""
    words = _WORD.findall(_normalize_for_shingles(text))
    if len(words) < ngram:
        return {b" ".join(words)} if words else set()
    return {b" ".join(words[i : i + ngram]) for i in range(len(words) - ngram + 1)}


class _Powers:
    """P^j and P^-j mod 2^64 for j < n, grown on demand (a per-process cache)."""

    def __init__(self) -> None:
        self.pow = np.ones(0, dtype=_U64)
        self.inv = np.ones(0, dtype=_U64)

    def get(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self.pow) < n:
            size = max(n, 2 * len(self.pow), 1 << 16)
            with np.errstate(over="ignore"):
                self.pow = np.cumprod(np.full(size, _POLY, dtype=_U64)) * _U64(_POLY_INV)
                self.inv = np.cumprod(np.full(size, _POLY_INV, dtype=_U64)) * _U64(_POLY)
        return self.pow[:n], self.inv[:n]


_powers = _Powers()


def shingle_hashes(texts: Sequence[str], ngram: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of every document's shingles, CSR style: (hashes uint32, offsets int64 (n+1,)).

    Shingles of document i are hashes[offsets[i]:offsets[i+1]] (repeats kept; MinHash ignores them).
    """
    encoded = [_normalize_for_shingles(t) for t in texts]
    n_docs = len(encoded)
    # "\n" is not a word byte: it separates documents and pads both ends, so every word has a
    # start and an end edge; document i's separator sits at doc_end[i].
    data = np.frombuffer(b"\n" + b"\n".join(encoded) + b"\n", dtype=np.uint8)
    doc_end = np.cumsum(np.fromiter((len(e) + 1 for e in encoded), dtype=np.int64, count=n_docs))
    is_word = _WORD_BYTE[data]
    edges = np.flatnonzero(is_word[1:] != is_word[:-1]) + 1
    starts, ends = edges[0::2], edges[1::2]
    if len(starts) == 0:
        return np.zeros(0, dtype=np.uint32), np.zeros(n_docs + 1, dtype=np.int64)

    # Word hash: polynomial sum_j byte_j * P^(j - start) mod 2^64 from one prefix sum over bytes.
    pow_, inv = _powers.get(len(data) + 1)
    prefix = np.zeros(len(data) + 1, dtype=_U64)
    np.cumsum(data.astype(_U64) * pow_[: len(data)], out=prefix[1:])
    words = (prefix[ends] - prefix[starts]) * inv[starts]
    words = _fmix64(words + (ends - starts).astype(_U64) * _U64(0x94D049BB133111EB))

    # Shingle hash: position-weighted sum of the n-gram's word hashes, never across documents.
    doc_of_word = np.searchsorted(doc_end, starts, side="right")
    words_per_doc = np.bincount(doc_of_word, minlength=n_docs)
    first_word = np.cumsum(words_per_doc) - words_per_doc
    n_words = len(words)
    padded = np.concatenate([words, np.zeros(ngram - 1, dtype=_U64)])
    acc = words * _NGRAM_WEIGHTS[0]
    for k in range(1, ngram):  # windows running past their document are dropped below
        acc += padded[k : k + n_words] * _NGRAM_WEIGHTS[k]
    last_of = (first_word + words_per_doc - 1)[doc_of_word]
    take = np.arange(n_words) + ngram - 1 <= last_of
    short = np.flatnonzero((words_per_doc > 0) & (words_per_doc < ngram))
    if len(short):  # a document shorter than one n-gram is one shingle of all its words
        first, count = first_word[short], words_per_doc[short]
        acc[first] = words[first] * _NGRAM_WEIGHTS[0]
        for k in range(1, ngram - 1):
            more = count > k
            acc[first[more]] += words[first[more] + k] * _NGRAM_WEIGHTS[k]
        take[first] = True
    hashes = (_fmix64(acc[take]) >> _U64(32)).astype(np.uint32)
    counts = np.bincount(doc_of_word[take], minlength=n_docs)
    return hashes, np.concatenate(([0], np.cumsum(counts))).astype(np.int64)


def permutations(cfg: MinHashConfig) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) of the affine maps h -> a*h + b mod 2^32, drawn as datasketch's affine32 draws them."""
    gen = np.random.RandomState(cfg.seed)
    a = gen.randint(0, 1 << 31, cfg.num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, cfg.num_perm, dtype=np.uint32)
    return a, b


def minhash_signatures(texts: Sequence[str], cfg: MinHashConfig) -> np.ndarray:
    """MinHash signatures (n, num_perm) uint32; a document without words gets all 0xFFFFFFFF."""
    hashes, offsets = shingle_hashes(texts, cfg.ngram)
    return _signatures_from_hashes(hashes, offsets, cfg)


def _signatures_from_hashes(hashes: np.ndarray, offsets: np.ndarray, cfg: MinHashConfig) -> np.ndarray:
    n_docs = len(offsets) - 1
    sig = np.full((n_docs, cfg.num_perm), EMPTY, dtype=np.uint32)
    a, b = permutations(cfg)
    mixed = _fmix32(hashes)[:, None]
    doc_of = np.repeat(np.arange(n_docs), np.diff(offsets))
    buf = np.empty((_BLOCK_ROWS, cfg.num_perm), dtype=np.uint32)
    for lo in range(0, len(hashes), _BLOCK_ROWS):
        hi = min(lo + _BLOCK_ROWS, len(hashes))
        block = buf[: hi - lo]
        np.multiply(mixed[lo:hi], a, out=block)
        np.add(block, b, out=block)
        # One segment per document present in the block; the first may continue the previous one.
        docs = doc_of[lo:hi]
        seg = np.flatnonzero(np.diff(docs, prepend=-1))
        mins = np.minimum.reduceat(block, seg, axis=0)
        rows = docs[seg]
        sig[rows] = np.minimum(sig[rows], mins)
    return sig


def _chunk_signatures(args: tuple[list[str], MinHashConfig]) -> np.ndarray:
    return minhash_signatures(*args)


def default_workers() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def signatures_from_chunks(
    chunks: Iterable[Sequence[str]], cfg: MinHashConfig, workers: int | None = None
) -> np.ndarray:
    """Signatures of a stream of text chunks, computed by `workers` processes (default: all cores).

    Only signatures are kept; at most 2 * workers chunks are in flight, so inputs larger than
    memory stream through.
    """
    workers = workers or default_workers()
    parts: list[np.ndarray] = [np.zeros((0, cfg.num_perm), dtype=np.uint32)]
    if workers == 1:
        parts += [minhash_signatures(list(chunk), cfg) for chunk in chunks]
        return np.concatenate(parts)
    with multiprocessing.get_context().Pool(workers) as pool:
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_chunk_signatures, ((list(chunk), cfg),)))
            if len(pending) >= 2 * workers:
                parts.append(pending.popleft().get())
        parts += [p.get() for p in pending]
    return np.concatenate(parts)


# ------------------------------------------------------------------------------------------------
# LSH, clusters, keep rule
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _row_weights(width: int) -> np.ndarray:
    return np.random.RandomState(0xB4D).randint(0, 1 << 63, width, dtype=_U64) * _U64(2) + _U64(1)


def _row_keys(rows: np.ndarray) -> np.ndarray:
    """A 64-bit key per row: a random linear combination of its values, then mixed."""
    if rows.shape[1] % 2 == 0 and rows.strides[1] == rows.itemsize:
        words = rows.view(_U64)  # pairs of uint32 read as one uint64: half the passes, no copy
    else:
        words = rows.astype(_U64)
    weights = _row_weights(words.shape[1])
    acc = np.zeros(len(rows), dtype=_U64)
    for k in range(words.shape[1]):
        acc += words[:, k] * weights[k]
    return _fmix64(acc)


def _equal_rows(rows: np.ndarray, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stable order that makes equal rows adjacent, and flags marking the first row of each run."""
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    same = sorted_key[1:] == sorted_key[:-1]
    check = np.flatnonzero(same)
    if np.any(rows[order[check]] != rows[order[check + 1]]):
        # Two different rows share a 64-bit key (about n^2 / 2^64 odds): group by the values.
        order = np.lexsort(rows.T[::-1])
        sorted_rows = rows[order]
        same = np.all(sorted_rows[1:] == sorted_rows[:-1], axis=1)
    return order, np.concatenate(([True], ~same))[: len(order)]


def _pairs_in_groups(members: np.ndarray, starts: np.ndarray, max_size: int) -> np.ndarray:
    """All pairs inside each group of `members` (a star from the first member if the group is big)."""
    sizes = np.diff(np.append(starts, len(members)))
    group_of = np.repeat(np.arange(len(starts)), sizes)
    pos = np.arange(len(members)) - starts[group_of]
    partners = sizes[group_of] - 1 - pos  # later members in the same group
    star = sizes[group_of] > max_size
    partners = np.where(star, np.where(pos == 0, partners, 0), partners)
    total = int(partners.sum())
    left = np.repeat(members, partners)
    step = np.arange(total) - np.repeat(np.cumsum(partners) - partners, partners)
    right = members[np.repeat(np.arange(len(members)) + 1, partners) + step]
    return np.stack([left, right], axis=1)


def _bucket_pairs(rows: np.ndarray, max_bucket_size: int) -> tuple[np.ndarray, int]:
    """Pairs (i < j) of rows equal on every column, and the number of buckets linked as stars."""
    order, is_start = _equal_rows(rows, _row_keys(rows))
    sizes = np.diff(np.append(np.flatnonzero(is_start), len(order)))
    dup_sizes = sizes[sizes > 1]
    if not len(dup_sizes):
        return np.zeros((0, 2), dtype=np.int64), 0
    # stable order: members ascend inside a bucket, so pairs come out i < j
    members = order[np.repeat(sizes > 1, sizes)]
    pairs = _pairs_in_groups(members, np.cumsum(dup_sizes) - dup_sizes, max_bucket_size)
    return pairs, int(np.sum(sizes > max_bucket_size))


def _band_pairs(signatures: np.ndarray, cfg: MinHashConfig, workers: int = 1) -> np.ndarray:
    """Distinct row pairs (i < j) of `signatures` that agree on all rows of at least one band.

    Bands are independent: `workers` threads take them in turn (numpy's sorts and arithmetic run
    without the GIL, so threads share the cores without copying the signatures).
    """
    bands = [signatures[:, b * cfg.rows : (b + 1) * cfg.rows] for b in range(cfg.bands)]
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(pool.map(lambda rows: _bucket_pairs(rows, cfg.max_bucket_size), bands))
    for band, (_, big) in enumerate(results):
        if big:
            log.info("band %d: %d buckets above %d documents linked as stars", band, big, cfg.max_bucket_size)
    pairs = np.concatenate([np.zeros((0, 2), dtype=np.int64)] + [p for p, _ in results])
    n = np.int64(len(signatures))
    codes = np.unique(pairs[:, 0] * n + pairs[:, 1])
    return np.stack([codes // n, codes % n], axis=1)


def lsh_candidate_pairs(signatures: np.ndarray, cfg: MinHashConfig, workers: int | None = None) -> np.ndarray:
    """Distinct pairs (i < j), sorted, that share at least one LSH band (and pass `threshold`);
    the bands are hashed and sorted on `workers` threads (default: all cores).

    Documents with identical signatures collide in every band, so they are grouped first and the
    bands only compare distinct signatures: exact duplicates cost one pass, not one per band.
    """
    n, width = signatures.shape
    if width != cfg.num_perm:
        raise ValueError(f"signatures have {width} values per document, but num_perm={cfg.num_perm}")
    maybe_empty = np.flatnonzero(signatures[:, 0] == EMPTY)
    empty = maybe_empty[np.all(signatures[maybe_empty] == EMPTY, axis=1)]
    valid = np.setdiff1d(np.arange(n), empty, assume_unique=True)
    rows = signatures[valid]
    order, is_start = _equal_rows(rows, _row_keys(rows))
    group = np.empty(len(valid), dtype=np.int64)
    group[order] = np.cumsum(is_start) - 1
    first = order[is_start]  # stable: the earliest document of each group
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))  # number groups in document order
    group, reps = rank[group], valid[np.sort(first)]

    rep_pairs = _band_pairs(signatures[reps], cfg, workers or default_workers())
    if cfg.threshold is not None and len(rep_pairs):
        rep_pairs = rep_pairs[estimated_jaccard(signatures, reps[rep_pairs]) >= cfg.threshold]
    pairs = _expand_groups(valid, group, len(reps), rep_pairs, cfg.max_bucket_size)
    codes = np.sort(pairs[:, 0] * np.int64(n) + pairs[:, 1])
    return np.stack([codes // n, codes % n], axis=1)


def _expand_groups(
    docs: np.ndarray, group: np.ndarray, n_groups: int, group_pairs: np.ndarray, max_size: int
) -> np.ndarray:
    """Document pairs inside each group and across each pair of groups (big groups: first member only)."""
    order = np.argsort(group, kind="stable")
    members = docs[order]  # grouped, ascending inside each group
    sizes = np.bincount(group, minlength=n_groups)
    starts = np.cumsum(sizes) - sizes
    multi = sizes > 1
    within = _pairs_in_groups(members[multi[group[order]]], np.cumsum(sizes[multi]) - sizes[multi], max_size)
    used = np.where(sizes > max_size, 1, sizes)  # a star group links to others through its first member
    u, v = group_pairs[:, 0], group_pairs[:, 1]
    count = used[u] * used[v]
    which = np.repeat(np.arange(len(u)), count)
    t = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
    a = members[starts[u][which] + t // used[v][which]]
    b = members[starts[v][which] + t % used[v][which]]
    across = np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1)
    return np.concatenate([within, across])


def estimated_jaccard(signatures: np.ndarray, pairs: np.ndarray, block: int = 65536) -> np.ndarray:
    """The fraction of equal signature values of each pair: MinHash's Jaccard estimate."""
    out = np.empty(len(pairs), dtype=np.float64)
    for lo in range(0, len(pairs), block):
        p = pairs[lo : lo + block]
        out[lo : lo + block] = np.mean(signatures[p[:, 0]] == signatures[p[:, 1]], axis=1)
    return out


def cluster_labels(n: int, pairs: np.ndarray) -> np.ndarray:
    """Union-find over the pairs; each document's label is the smallest index in its cluster."""
    parent = np.arange(n, dtype=np.int64)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if len(pairs) and (pairs.min() < 0 or pairs.max() >= n):
        raise ValueError(f"pair indices must lie in [0, {n}), got [{pairs.min()}, {pairs.max()}]")
    while True:
        while True:  # pointer jumping: every node points at its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
        ri, rj = parent[pairs[:, 0]], parent[pairs[:, 1]]
        differ = ri != rj
        if not differ.any():
            return parent
        # Hook the larger root under the smaller: parent[x] <= x always, so no cycles form.
        np.minimum.at(parent, np.maximum(ri[differ], rj[differ]), np.minimum(ri[differ], rj[differ]))


def keep_mask(labels: np.ndarray) -> np.ndarray:
    """Keep rule: the first document (in input order) of every cluster; True = keep."""
    return labels == np.arange(len(labels))


def cluster_stats(labels: np.ndarray) -> dict:
    """Cluster-size statistics for the report: duplicate clusters, removed documents, histogram."""
    sizes = np.bincount(labels, minlength=len(labels))
    sizes = sizes[sizes > 1]
    histogram = collections.Counter(sizes.tolist())
    return {
        "documents": int(len(labels)),
        "duplicate_clusters": int(len(sizes)),
        "documents_in_duplicate_clusters": int(sizes.sum()),
        "removed": int(sizes.sum() - len(sizes)),
        "largest_cluster": int(sizes.max()) if len(sizes) else 1,
        "cluster_sizes": {int(k): int(v) for k, v in sorted(histogram.items())},
    }
