"""Heuristic quality filters for prose: Gopher quality and repetition rules, and C4's line rules.

Defaults are the published ones:
- Gopher (Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights from Training
  Gopher", Appendix A.1.1 and Table A1): quality rules and repetition removal.
- C4 (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
  Transformer", Section 2.2), with the line rules of its reference implementation
  (tensorflow_datasets c4_utils) as datatrove also applies them.

Words are whitespace-separated tokens (the rules are language-agnostic counts); n-gram
statistics are computed with numpy over hashed words, not with Python loops over n-grams.

Public API: `GopherQuality`, `GopherRepetition`, `C4Quality`, `duplicate_fractions`,
`top_ngram_char_fraction`, `duplicated_ngram_char_fraction`.
"""

from __future__ import annotations

import re
import string
from dataclasses import replace

import numpy as np
from pydantic import Field

from dsv3.data.document import Document, Step, StepParams

__all__ = [
    "GopherQuality",
    "GopherRepetition",
    "C4Quality",
    "duplicate_fractions",
    "top_ngram_char_fraction",
    "duplicated_ngram_char_fraction",
]

# ------------------------------------------------------------------------------------------------
# Gopher quality
# ------------------------------------------------------------------------------------------------

GOPHER_STOP_WORDS = ["the", "be", "to", "of", "and", "that", "have", "with"]
_PUNCT = string.punctuation + "…–—‘’“”«»·•"
_PUNCT_OR_SPACE = str.maketrans("", "", _PUNCT + " \t\n\r\f\v")
_CONTENT_WORD = re.compile(r"\S*[^\s" + re.escape(_PUNCT) + r"]\S*")  # a word with a non-punctuation char
_ALPHA_WORD = re.compile(r"\S*[^\W\d_]\S*")  # a word with a letter
_BULLETS = ("•", "●", "○", "◦", "▪", "▫", "‣", "⁃", "-", "*", "–", "—")
_ELLIPSES = ("...", "…")


class GopherQualityParams(StepParams):
    """Gopher's quality rules; null disables a rule."""

    min_words: int | None = Field(default=50, description="Gopher: 50")
    max_words: int | None = Field(default=100_000, description="Gopher: 100,000")
    min_mean_word_length: float | None = Field(default=3.0, description="Gopher: 3 characters")
    max_mean_word_length: float | None = Field(default=10.0, description="Gopher: 10 characters")
    max_symbol_word_ratio: float | None = Field(
        default=0.1, description="Gopher: 0.1, for '#' and for ellipses"
    )
    max_bullet_lines_ratio: float | None = Field(
        default=0.9, description="Gopher: 90% of lines start with a bullet"
    )
    max_ellipsis_lines_ratio: float | None = Field(
        default=0.3, description="Gopher: 30% of lines end in an ellipsis"
    )
    min_alpha_words_ratio: float | None = Field(
        default=0.8, description="Gopher: 80% of words contain a letter"
    )
    min_stop_words: int | None = Field(default=2, description="Gopher: at least two of the stop words")
    stop_words: list[str] = Field(default_factory=lambda: list(GOPHER_STOP_WORDS))


class GopherQuality(Step):
    """Gopher's document quality rules (Rae et al. 2021, A.1.1): length, word length, symbols,
    bullet/ellipsis lines, alphabetic words and English stop words."""

    type = "gopher_quality"
    Params = GopherQualityParams

    def __init__(self, params: GopherQualityParams | None = None):
        super().__init__(params)
        words = "|".join(map(re.escape, self.params.stop_words)) or "(?!)"
        self._stop = re.compile(rf"(?<!\S)(?:{words})(?![^\s{re.escape(_PUNCT)}])", re.I)

    def process(self, doc: Document) -> Document | str:
        p, text = self.params, doc.text
        n_words = len(text.split())
        if p.min_words is not None and n_words < p.min_words:
            return "too_few_words"
        if p.max_words is not None and n_words > p.max_words:
            return "too_many_words"
        content = len(_CONTENT_WORD.findall(text))
        mean_len = len(text.translate(_PUNCT_OR_SPACE)) / content if content else 0.0
        if p.min_mean_word_length is not None and mean_len < p.min_mean_word_length:
            return "short_mean_word_length"
        if p.max_mean_word_length is not None and mean_len > p.max_mean_word_length:
            return "long_mean_word_length"
        if p.max_symbol_word_ratio is not None and n_words:
            if text.count("#") / n_words > p.max_symbol_word_ratio:
                return "hash_to_word_ratio"
            if (text.count("...") + text.count("…")) / n_words > p.max_symbol_word_ratio:
                return "ellipsis_to_word_ratio"
        lines = [line.strip() for line in text.split("\n") if line.strip()] or [""]
        bullets = sum(line.startswith(_BULLETS) for line in lines) / len(lines)
        if p.max_bullet_lines_ratio is not None and bullets > p.max_bullet_lines_ratio:
            return "bullet_lines_ratio"
        ellipses = sum(line.endswith(_ELLIPSES) for line in lines) / len(lines)
        if p.max_ellipsis_lines_ratio is not None and ellipses > p.max_ellipsis_lines_ratio:
            return "ellipsis_lines_ratio"
        alpha = len(_ALPHA_WORD.findall(text)) / n_words if n_words else 0.0
        if p.min_alpha_words_ratio is not None and alpha < p.min_alpha_words_ratio:
            return "few_alphabetic_words"
        if p.min_stop_words is not None and len(self._stop.findall(text)) < p.min_stop_words:
            return "few_stop_words"
        return doc


# ------------------------------------------------------------------------------------------------
# Gopher repetition
# ------------------------------------------------------------------------------------------------


def duplicate_fractions(items: list[str]) -> tuple[float, float]:
    """(share of items that repeat an earlier one, share of characters in those repeats)."""
    if not items:
        return 0.0, 0.0
    seen: set[str] = set()
    dup_items = dup_chars = 0
    for item in items:
        if item in seen:
            dup_items += 1
            dup_chars += len(item)
        else:
            seen.add(item)
    total_chars = sum(map(len, items))
    return dup_items / len(items), (dup_chars / total_chars if total_chars else 0.0)


_NGRAM_WEIGHTS = (
    np.random.RandomState(0x60F).randint(1, 1 << 62, 16, dtype=np.int64).astype(np.uint64) * 2 + 1
)


def _ngram_ids(hashes: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """For each n-gram position, the id of its distinct n-gram, and the count of each id."""
    m = len(hashes) - n + 1
    keys = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):  # n <= 10 vectorised passes, never a loop over n-grams
            keys += hashes[k : k + m] * _NGRAM_WEIGHTS[k]
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    return inverse.reshape(-1), counts


def _word_arrays(words: list[str]) -> tuple[np.ndarray, np.ndarray]:
    hashes = np.fromiter(map(hash, words), dtype=np.int64, count=len(words)).view(np.uint64)
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    return hashes, lengths


def top_ngram_char_fraction(words: list[str], n: int, _arrays=None) -> float:
    """Characters covered by the most frequent word n-gram (if it repeats) over all word characters;
    among equally frequent n-grams the longest counts, so the result never depends on hashing."""
    if len(words) < n:
        return 0.0
    hashes, lengths = _arrays or _word_arrays(words)
    total = int(lengths.sum())
    inverse, counts = _ngram_ids(hashes, n)
    top = int(counts.max())
    if top < 2 or total == 0:
        return 0.0
    prefix = np.concatenate(([0], np.cumsum(lengths)))
    chars = prefix[n:] - prefix[:-n]  # characters of the n-gram starting at each position
    return min(1.0, top * int(chars[counts[inverse] == top].max()) / total)


def duplicated_ngram_char_fraction(words: list[str], n: int, _arrays=None) -> float:
    """Characters of words inside any n-gram that occurs more than once, over all word characters
    (each character counted once, however many duplicated n-grams overlap it)."""
    if len(words) < n:
        return 0.0
    hashes, lengths = _arrays or _word_arrays(words)
    total = int(lengths.sum())
    inverse, counts = _ngram_ids(hashes, n)
    dup_start = counts[inverse] > 1
    if not dup_start.any() or total == 0:
        return 0.0
    m = len(dup_start)
    prefix = np.concatenate(([0], np.cumsum(dup_start)))
    i = np.arange(len(words))
    # word i lies in the n-grams starting at max(0, i-n+1) .. min(i, m-1)
    covered = prefix[np.minimum(i, m - 1) + 1] - prefix[np.maximum(i - n + 1, 0)] > 0
    return int(lengths[covered].sum()) / total


class GopherRepetitionParams(StepParams):
    """Gopher's repetition thresholds (Rae et al. 2021, Table A1); null disables a rule."""

    max_duplicate_line_fraction: float | None = Field(default=0.30, description="Gopher: 0.30")
    max_duplicate_paragraph_fraction: float | None = Field(default=0.30, description="Gopher: 0.30")
    max_duplicate_line_char_fraction: float | None = Field(default=0.20, description="Gopher: 0.20")
    max_duplicate_paragraph_char_fraction: float | None = Field(default=0.20, description="Gopher: 0.20")
    max_top_ngram_char_fraction: dict[int, float] = Field(
        default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16}, description="n -> max; Gopher: n = 2, 3, 4"
    )
    max_duplicated_ngram_char_fraction: dict[int, float] = Field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        description="n -> max; Gopher: n = 5..10",
    )


_PARAGRAPHS = re.compile(r"\n\s*\n")


class GopherRepetition(Step):
    """Gopher's repetition removal (Rae et al. 2021, A.1.1): repeated lines, paragraphs and n-grams."""

    type = "gopher_repetition"
    Params = GopherRepetitionParams

    def process(self, doc: Document) -> Document | str:
        p, text = self.params, doc.text
        lines = [line for line in text.split("\n") if line.strip()]
        line_frac, line_chars = duplicate_fractions(lines)
        if p.max_duplicate_line_fraction is not None and line_frac > p.max_duplicate_line_fraction:
            return "duplicate_lines"
        if p.max_duplicate_line_char_fraction is not None and line_chars > p.max_duplicate_line_char_fraction:
            return "duplicate_line_chars"
        paragraphs = [para.strip() for para in _PARAGRAPHS.split(text) if para.strip()]
        para_frac, para_chars = duplicate_fractions(paragraphs)
        if p.max_duplicate_paragraph_fraction is not None and para_frac > p.max_duplicate_paragraph_fraction:
            return "duplicate_paragraphs"
        if (
            p.max_duplicate_paragraph_char_fraction is not None
            and para_chars > p.max_duplicate_paragraph_char_fraction
        ):
            return "duplicate_paragraph_chars"
        words = text.split()
        arrays = _word_arrays(words)
        for n, limit in sorted(p.max_top_ngram_char_fraction.items()):
            if top_ngram_char_fraction(words, n, arrays) > limit:
                return f"top_{n}gram"
        dup_limits = sorted(p.max_duplicated_ngram_char_fraction.items())
        for k, (n, limit) in enumerate(dup_limits):
            fraction = duplicated_ngram_char_fraction(words, n, arrays)
            if fraction > limit:
                return f"duplicated_{n}grams"
            # Words covered by repeated (n+1)-grams are covered by repeated n-grams, so the fraction
            # only falls with n: once it is under every remaining limit, no larger n can fail.
            if all(fraction <= rest for _, rest in dup_limits[k + 1 :]):
                break
        return doc


# ------------------------------------------------------------------------------------------------
# C4
# ------------------------------------------------------------------------------------------------

C4_END_PUNCTUATION = (".", "?", "!", '"', "'")
C4_POLICY = (
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
)
_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]", re.I)
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s|$)")


class C4QualityParams(StepParams):
    """C4's rules (Raffel et al. 2020, 2.2); line rules drop lines, page rules drop the document."""

    terminal_punctuation: bool = Field(default=True, description="keep only lines ending in . ? ! \" '")
    min_words_per_line: int | None = Field(default=3, description="C4: lines with fewer words are dropped")
    max_word_length: int | None = Field(
        default=1000, description="C4 code: lines with a longer word are dropped"
    )
    min_sentences: int | None = Field(default=5, description="C4: pages with fewer sentences are dropped")
    remove_citations: bool = Field(default=True, description="strip [1], [edit], [citation needed]")
    javascript: bool = Field(default=True, description="drop lines mentioning javascript")
    policy: bool = Field(default=True, description="drop lines with cookie / terms-of-use boilerplate")
    lorem_ipsum: bool = Field(default=True, description="drop pages containing 'lorem ipsum'")
    curly_brace: bool = Field(default=True, description="drop pages containing '{' (code in prose)")


class C4Quality(Step):
    """C4's clean-up of web pages (Raffel et al. 2020): drops boilerplate lines, then pages that are
    placeholder text, contain code, or keep fewer than `min_sentences` sentences."""

    type = "c4_quality"
    Params = C4QualityParams

    def process(self, doc: Document) -> Document | str:
        p, text = self.params, doc.text
        lowered = text.lower()
        if p.lorem_ipsum and "lorem ipsum" in lowered:
            return "lorem_ipsum"
        if p.curly_brace and "{" in text:
            return "curly_brace"
        kept, sentences = [], 0
        for line in text.split("\n"):
            line = line.strip()
            words = line.split()
            if p.max_word_length is not None and any(len(w) > p.max_word_length for w in words):
                continue
            if p.remove_citations:
                line = _CITATION.sub("", line)
            if p.terminal_punctuation and (not line.endswith(C4_END_PUNCTUATION) or line.endswith("...")):
                continue
            if p.min_words_per_line is not None and len(words) < p.min_words_per_line:
                continue
            low = line.lower()
            if p.javascript and "javascript" in low:
                continue
            if p.policy and any(phrase in low for phrase in C4_POLICY):
                continue
            kept.append(line)
            sentences += max(1, len(_SENTENCE_END.findall(line)))
        if p.min_sentences is not None and sentences < p.min_sentences:
            return "too_few_sentences"
        if not kept:
            return "no_lines_left"
        new_text = "\n".join(kept)
        return doc if new_text == text else replace(doc, text=new_text)
