"""Dedup: planted duplicates are found, distinct documents are not merged, and the MinHash
estimates agree with datasketch (the reference) on the same shingles."""

from __future__ import annotations

import random

import datasketch
import numpy as np
import pytest
from pydantic import ValidationError

from dsv3.data.dedup import (
    EMPTY,
    MinHashConfig,
    cluster_labels,
    cluster_stats,
    estimated_jaccard,
    exact_keys,
    exact_labels,
    keep_mask,
    lsh_candidate_pairs,
    minhash_signatures,
    normalize_text,
    shingle_hashes,
    signatures_from_chunks,
    word_shingles,
)


def _vocabulary(rng: random.Random, size: int = 3000) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return sorted({"".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(size)})


def _sentence(rng: random.Random, vocab: list[str]) -> str:
    # Zipf-like word frequencies, as in natural text: frequent words repeat, n-grams rarely do.
    words = [vocab[min(int(rng.paretovariate(1.1)) - 1, len(vocab) - 1)] if rng.random() < 0.4
             else rng.choice(vocab) for _ in range(rng.randint(10, 18))]
    return " ".join(words).capitalize() + "."


def _planted_corpus(seed: int = 0):
    """Distinct originals, hard negatives sharing a third of an original, and planted duplicates."""
    rng = random.Random(seed)
    vocab = _vocabulary(rng)
    originals = [[_sentence(rng, vocab) for _ in range(30)] for _ in range(120)]
    texts, family = [" ".join(s) for s in originals], list(range(len(originals)))
    boilerplate = ("Copyright the authors. All rights reserved. Share and enjoy, subscribe to our newsletter."
                   " Cookies help us deliver our services; by using them you agree to our use of cookies.")
    for i, sentences in enumerate(originals[:80]):
        variant = list(sentences)
        kind = i % 4
        if kind == 0:  # exact copy up to case and whitespace
            text = "  ".join(variant).upper()
        elif kind == 1:  # a few words changed
            words = " ".join(variant).split()
            for pos in rng.sample(range(len(words)), 8):
                words[pos] = rng.choice(vocab)
            text = " ".join(words)
        elif kind == 2:  # sentences reordered: three swaps
            for _ in range(3):
                a, b = rng.sample(range(len(variant)), 2)
                variant[a], variant[b] = variant[b], variant[a]
            text = " ".join(variant)
        else:  # boilerplate added at both ends
            text = f"{boilerplate} {' '.join(variant)} {boilerplate}"
        texts.append(text)
        family.append(i)
    for i, sentences in enumerate(originals[80:100]):  # hard negatives: J ~ 0.3 with an original
        texts.append(" ".join(sentences[:14] + [_sentence(rng, vocab) for _ in range(16)]))
        family.append(len(originals) + i)
    return texts, np.array(family)


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def _pair_set(labels: np.ndarray) -> set[tuple[int, int]]:
    pairs = set()
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label).tolist()
        pairs |= {(a, b) for i, a in enumerate(members) for b in members[i + 1 :]}
    return pairs


def test_planted_duplicates_found_with_high_precision_and_recall():
    texts, family = _planted_corpus()
    cfg = MinHashConfig()
    true_pairs = _pair_set(family)
    shingles = [word_shingles(t, cfg.ngram) for t in texts]
    for a, b in true_pairs:  # the planted copies are near duplicates, the negatives are not
        assert _jaccard(shingles[a], shingles[b]) > 0.75
    negatives = [_jaccard(shingles[80 + k], shingles[200 + k]) for k in range(20)]
    assert min(negatives) > 0.2 and max(negatives) < 0.5

    labels = cluster_labels(len(texts), lsh_candidate_pairs(minhash_signatures(texts, cfg), cfg))
    found = _pair_set(labels)
    hits = len(found & true_pairs)
    assert hits / len(found) >= 0.95 and hits / len(true_pairs) >= 0.95, (hits, len(found), len(true_pairs))
    # Distinct documents are never merged: no cluster spans two families.
    for label in np.unique(labels):
        assert len(set(family[labels == label])) == 1
    assert keep_mask(labels).sum() == len(set(family.tolist()))


def test_signatures_are_datasketch_affine32_given_the_same_shingle_hashes():
    texts, _ = _planted_corpus()
    cfg = MinHashConfig(seed=7)
    hashes, offsets = shingle_hashes(texts[:40], cfg.ngram)
    ours = minhash_signatures(texts[:40], cfg)
    for i in range(40):
        ref = datasketch.MinHash(num_perm=cfg.num_perm, seed=cfg.seed, hashfunc=int)
        ref.update_batch(hashes[offsets[i] : offsets[i + 1]].tolist())
        np.testing.assert_array_equal(ours[i], ref.hashvalues)


def _set_pair(rng: np.random.Generator, jaccard: float, size: int = 300) -> tuple[str, str]:
    """Two texts whose unigram shingle sets have exactly the given Jaccard similarity."""
    common = round(2 * size * jaccard / (1 + jaccard))
    ids = rng.choice(10**7, size=2 * size - common, replace=False)
    a = ids[:size]
    b = np.concatenate([ids[:common], ids[size:]])
    return " ".join(f"w{i}" for i in a), " ".join(f"w{i}" for i in b)


def test_jaccard_estimates_agree_with_datasketch_within_sampling_error():
    cfg = MinHashConfig(ngram=1)
    rng = np.random.default_rng(0)
    truths = rng.uniform(0.05, 0.95, size=150)
    texts = [t for j in truths for t in _set_pair(rng, j)]
    sig = minhash_signatures(texts, cfg)
    pairs = np.arange(len(texts)).reshape(-1, 2)
    ours = estimated_jaccard(sig, pairs)
    ref = []
    for a, b in zip(texts[0::2], texts[1::2], strict=True):
        ma, mb = (datasketch.MinHash(num_perm=cfg.num_perm, seed=cfg.seed) for _ in range(2))
        ma.update_batch(word_shingles(a, 1))
        mb.update_batch(word_shingles(b, 1))
        ref.append(ma.jaccard(mb))
    ref = np.array(ref)
    exact = np.array([_jaccard(word_shingles(texts[i], 1), word_shingles(texts[j], 1)) for i, j in pairs])
    sigma = np.sqrt(exact * (1 - exact) / cfg.num_perm)
    assert np.all(np.abs(ours - exact) <= 4 * sigma + 1e-9)
    assert np.all(np.abs(ours - ref) <= 4 * np.sqrt(2) * sigma + 1e-9)
    assert abs(np.mean(ours - exact)) < 0.01  # unbiased, like the reference
    assert 0.7 < np.mean(np.abs(ours - exact)) / np.mean(np.abs(ref - exact)) < 1.4


def test_detection_rate_follows_the_lsh_s_curve():
    cfg = MinHashConfig(ngram=1)
    rng = np.random.default_rng(1)
    for jaccard in (0.5, 0.7, 0.9):
        texts = [t for _ in range(200) for t in _set_pair(rng, jaccard, size=200)]
        found = {tuple(p) for p in lsh_candidate_pairs(minhash_signatures(texts, cfg), cfg).tolist()}
        rate = np.mean([(i, i + 1) in found for i in range(0, len(texts), 2)])
        expected = cfg.candidate_probability(jaccard)
        assert abs(rate - expected) < 4 * np.sqrt(expected * (1 - expected) / 200) + 0.01, (jaccard, rate)
    assert cfg.midpoint == pytest.approx(0.685, abs=1e-3)


def test_shingle_hash_depends_only_on_the_shingle():
    text = "Alpha beta, gamma! delta epsilon zeta_eta  Théta iota kappa"
    words = normalize_text(text).replace(",", "").replace("!", "").split()
    hashes, offsets = shingle_hashes([text], 5)
    assert offsets.tolist() == [0, len(words) - 4]
    alone, _ = shingle_hashes([" ".join(words[i : i + 5]) for i in range(len(words) - 4)], 5)
    np.testing.assert_array_equal(hashes, alone)
    assert len(set(hashes.tolist())) == len(word_shingles(text, 5))


def test_short_and_empty_documents():
    cfg = MinHashConfig()
    texts = ["two words", "Two  WORDS", "", "!!! ---", "two words more"]
    hashes, offsets = shingle_hashes(texts, cfg.ngram)
    assert np.diff(offsets).tolist() == [1, 1, 0, 0, 1]
    sig = minhash_signatures(texts, cfg)
    assert np.all(sig[2] == EMPTY) and np.all(sig[3] == EMPTY)
    assert lsh_candidate_pairs(sig, cfg).tolist() == [[0, 1]]  # empty documents are never paired
    assert lsh_candidate_pairs(sig[2:4], cfg).shape == (0, 2)  # only empty documents
    assert lsh_candidate_pairs(minhash_signatures([], cfg), cfg).shape == (0, 2)
    assert signatures_from_chunks([], cfg, workers=2).shape == (0, cfg.num_perm)


def test_exact_keys_normalise_case_whitespace_and_unicode():
    texts = ["Caf\u00e9  au\tlait\n", "café au lait", "CAFE\u0301 AU LAIT", "café au lait!"]
    keys = exact_keys(texts)
    assert keys.dtype == np.uint64
    assert keys[0] == keys[1] == keys[2] != keys[3]
    assert exact_keys(texts, normalize=False)[0] != exact_keys(texts, normalize=False)[1]
    assert exact_labels(keys).tolist() == [0, 0, 0, 3]


def _reference_components(n: int, pairs: list[tuple[int, int]]) -> list[int]:
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    return [find(x) for x in range(n)]


@pytest.mark.parametrize("seed", range(5))
def test_union_find_matches_a_reference(seed):
    rng = random.Random(seed)
    n = 500
    pairs = [(rng.randrange(n), rng.randrange(n)) for _ in range(300)]
    pairs += [(i, i + 1) for i in range(100, 180)]  # a long chain
    labels = cluster_labels(n, np.array(pairs))
    assert labels.tolist() == _reference_components(n, pairs)
    assert cluster_labels(3, np.zeros((0, 2), dtype=np.int64)).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        cluster_labels(3, np.array([[0, 3]]))


def test_keep_rule_and_stats():
    labels = cluster_labels(6, np.array([[4, 1], [1, 3], [5, 2]]))
    assert labels.tolist() == [0, 1, 2, 1, 1, 2]
    assert keep_mask(labels).tolist() == [True, True, True, False, False, False]
    stats = cluster_stats(labels)
    assert stats["duplicate_clusters"] == 2 and stats["removed"] == 3
    assert stats["cluster_sizes"] == {2: 1, 3: 1} and stats["largest_cluster"] == 3


def test_keep_rule_is_independent_of_chunking_and_workers():
    texts, _ = _planted_corpus(seed=3)
    cfg = MinHashConfig()
    one = signatures_from_chunks([texts], cfg, workers=1)
    chunks = (texts[i : i + 17] for i in range(0, len(texts), 17))
    two = signatures_from_chunks(chunks, cfg, workers=2)
    np.testing.assert_array_equal(one, two)
    keep = [keep_mask(cluster_labels(len(texts), lsh_candidate_pairs(s, cfg))) for s in (one, two)]
    np.testing.assert_array_equal(*keep)


def test_big_buckets_are_linked_as_stars_and_threshold_filters():
    sig = np.zeros((5, 4), dtype=np.uint32)
    sig[:, 2:] = np.arange(5)[:, None]  # the second band differs everywhere
    cfg = MinHashConfig(num_perm=4, bands=2, rows=2, max_bucket_size=3)
    assert lsh_candidate_pairs(sig, cfg).tolist() == [[0, 1], [0, 2], [0, 3], [0, 4]]
    wide = cfg.model_copy(update={"max_bucket_size": 10})
    assert len(lsh_candidate_pairs(sig, wide)) == 10
    strict = cfg.model_copy(update={"threshold": 0.75})
    assert len(lsh_candidate_pairs(sig, strict)) == 0  # estimated Jaccard is 0.5


def test_config_validation():
    with pytest.raises(ValidationError, match="bands \\* rows must equal num_perm"):
        MinHashConfig(num_perm=100)
    with pytest.raises(ValidationError, match="extra"):
        MinHashConfig(permutations=3)
    with pytest.raises(ValueError, match="num_perm=112"):
        lsh_candidate_pairs(np.zeros((2, 8), dtype=np.uint32), MinHashConfig())


def _brute_force_pairs(sig: np.ndarray, cfg: MinHashConfig) -> list[list[int]]:
    bands = sig.reshape(len(sig), cfg.bands, cfg.rows)
    empty = np.all(sig == EMPTY, axis=1)
    return [[i, j] for i in range(len(sig)) for j in range(i + 1, len(sig))
            if not empty[i] and not empty[j] and np.any(np.all(bands[i] == bands[j], axis=1))]


def test_lsh_pairs_equal_brute_force_with_identical_and_empty_signatures():
    rng = np.random.default_rng(5)
    cfg = MinHashConfig(num_perm=8, bands=4, rows=2)
    sig = rng.integers(0, 3, size=(120, 8)).astype(np.uint32)  # small alphabet: many collisions
    sig[10:20] = sig[3]  # a group of identical signatures
    sig[50] = sig[60] = EMPTY
    pairs = lsh_candidate_pairs(sig, cfg)
    assert pairs.tolist() == _brute_force_pairs(sig, cfg)
    limited = lsh_candidate_pairs(sig, cfg.model_copy(update={"max_bucket_size": 4}))
    assert set(map(tuple, limited.tolist())) <= set(map(tuple, pairs.tolist()))
    assert np.array_equal(cluster_labels(120, limited), cluster_labels(120, pairs))  # stars keep clusters
