"""Heuristic filters: each rule removes its positive case and keeps a clean negative; the vectorised
n-gram statistics equal a plain-Python reference; `when` scopes a step; language id."""

from __future__ import annotations

import collections
import random

import pytest

from dsv3.data.document import Document
from dsv3.data.steps.code import CodeQuality
from dsv3.data.steps.filters import (
    C4Quality,
    GopherQuality,
    GopherRepetition,
    duplicate_fractions,
    duplicated_ngram_char_fraction,
    top_ngram_char_fraction,
)
from dsv3.data.steps.langid import LanguageFilter

CLEAN = (
    "The river starts in the hills above the town, where the snow melts in spring and runs down through "
    "the pine woods. By the time it reaches the old mill it is wide enough for a boat.\n"
    "Every morning the baker opens the shop at six. She lights the oven, weighs the flour, and sets the "
    "dough to rise while the street is still dark. By seven the first customers are waiting at the door.\n"
    "The library keeps its oldest books in a cool room behind the reading hall. Readers may ask for them "
    "at the desk, and a librarian brings them out one at a time on a grey cushion."
)


def _verdict(step, text: str) -> str:
    """'kept', or the removal reason."""
    out = list(step.run([Document("d", text)]))
    return "kept" if out else next(iter(step.stats.removed))


@pytest.mark.parametrize(
    "text,reason",
    [
        ("Too short to be a page of text with the words in it.", "too_few_words"),
        (" ".join(["a b c d"] * 40) + " the and", "short_mean_word_length"),
        (" ".join(["incomprehensibilities"] * 60) + " the of", "long_mean_word_length"),
        (CLEAN + " #tag" * 20, "hash_to_word_ratio"),
        (CLEAN + " wait..." * 20, "ellipsis_to_word_ratio"),
        ("\n".join(f"- item number {i} of the list and more" for i in range(20)), "bullet_lines_ratio"),
        (
            "\n".join(
                f"Line {i} of the story, and then the hero walked into the dark forest…" for i in range(20)
            ),
            "ellipsis_lines_ratio",
        ),
        (CLEAN + " " + " ".join(["1234", "5678", "=="] * 20), "few_alphabetic_words"),
        (
            CLEAN.replace("the ", "a ")
            .replace("The ", "A ")
            .replace(" and", " or")
            .replace(" of", " in")
            .replace(" to ", " in ")
            .replace(" with", " near"),
            "few_stop_words",
        ),
    ],
)
def test_gopher_quality_rules(text, reason):
    assert _verdict(GopherQuality(), CLEAN) == "kept"
    assert _verdict(GopherQuality(), text) == reason


def test_gopher_thresholds_come_from_the_yaml():
    short = "The baker opens the shop early, and the customers wait with their baskets."
    assert _verdict(GopherQuality(), short) == "too_few_words"
    assert _verdict(GopherQuality(GopherQuality.Params(min_words=5)), short) == "kept"
    assert _verdict(GopherQuality(GopherQuality.Params(min_words=None)), short) == "kept"


def _reference_top(words, n):
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    counts = collections.Counter(grams)
    count = max(counts.values())
    longest = max(sum(map(len, gram)) for gram, c in counts.items() if c == count)  # ties: the longest
    total = sum(map(len, words))
    return 0.0 if count < 2 else min(1.0, count * longest / total)


def _reference_duplicated(words, n):
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    counts = collections.Counter(grams)
    covered = set()
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            covered.update(range(i, i + n))
    total = sum(map(len, words))
    return sum(len(words[i]) for i in covered) / total if total else 0.0


def test_ngram_statistics_equal_a_plain_python_reference():
    rng = random.Random(0)
    vocab = ["alpha", "be", "c", "delta", "echo", "f", "golf", "hotel"]
    for trial in range(200):
        words = [rng.choice(vocab[: rng.randint(2, 8)]) for _ in range(rng.randint(0, 60))]
        for n in (2, 3, 4):
            assert top_ngram_char_fraction(words, n) == pytest.approx(_reference_top(words, n)), trial
        for n in range(5, 11):
            assert duplicated_ngram_char_fraction(words, n) == pytest.approx(_reference_duplicated(words, n))
    assert duplicate_fractions(["a", "bb", "a", "a"]) == (0.5, pytest.approx(2 / 5))


@pytest.mark.parametrize(
    "text,reason",
    [
        ("\n".join(["Buy cheap shoes online today."] * 6 + [CLEAN]), "duplicate_lines"),
        (
            "\n".join([CLEAN, *(f"Short note {i}." for i in range(8)), CLEAN.split("\n")[1]]),
            "duplicate_line_chars",
        ),
        (CLEAN + "\n\n" + "the cat the cat " * 40, "top_2gram"),
        (
            CLEAN + " Trains to the coast leave at nine and stop at every station along the valley." * 2,
            "duplicated_5grams",
        ),
    ],
)
def test_gopher_repetition_rules(text, reason):
    assert _verdict(GopherRepetition(), CLEAN) == "kept"
    assert _verdict(GopherRepetition(), text) == reason


def test_c4_drops_boilerplate_lines_and_bad_pages():
    page = CLEAN + (
        "\nHome | About | Contact\nThis site uses cookies to improve your experience.\n"
        "Please enable JavaScript to view the comments.\nRead more"
    )
    step = C4Quality(C4Quality.Params(min_sentences=3))
    out = list(step.run([Document("p", page)]))
    assert out[0].text == CLEAN and step.stats.modified == 1
    assert (
        _verdict(C4Quality(C4Quality.Params(min_sentences=3)), CLEAN + "\nLorem ipsum dolor sit amet.")
        == "lorem_ipsum"
    )
    assert (
        _verdict(C4Quality(C4Quality.Params(min_sentences=3)), CLEAN + "\nUse f() { return 1; }.")
        == "curly_brace"
    )
    assert _verdict(C4Quality(), CLEAN) == "kept"  # 7 sentences: C4 asks for 5
    assert (
        _verdict(C4Quality(), "One short line. And another one here.\nA third, then done.")
        == "too_few_sentences"
    )
    step = C4Quality(C4Quality.Params(min_sentences=None))
    assert _verdict(step, "menu\nlogin\nno sentences here") == "no_lines_left"


CODE = 'def area(width, height):\n    """Area of a rectangle."""\n    return width * height\n'


@pytest.mark.parametrize(
    "text,reason",
    [
        ("x = [" + ", ".join(["1"] * 600) + "]\n", "long_line"),
        ("\n".join(["values = " + "abcdefgh" * 14] * 5), "long_mean_line"),
        ("{}[]()<>;;;;,,,,....====++++----****////" * 5 + "\nab\n", "low_alphanumeric_fraction"),
        (
            "# -*- coding: utf-8 -*-\n# Generated by the protocol buffer compiler.  DO NOT EDIT!\n" + CODE,
            "autogenerated",
        ),
    ],
)
def test_code_rules(text, reason):
    assert _verdict(CodeQuality(), CODE) == "kept"
    assert _verdict(CodeQuality(), text) == reason


def test_when_scopes_a_step_to_matching_documents():
    step = GopherQuality(GopherQuality.Params(when={"meta.kind": ["prose", "docs"]}))
    docs = [
        Document("code", CODE, {"kind": "code"}),
        Document("prose", "Too short.", {"kind": "prose"}),
        Document("none", "Too short.", {}),
    ]
    assert [d.id for d in step.run(docs)] == ["code", "none"]
    assert step.stats.passed_through == 2 and dict(step.stats.removed) == {"too_few_words": 1}


def test_language_allow_list_and_score_threshold():
    german = (
        "Der Fluss entspringt in den Hügeln oberhalb der Stadt, wo der Schnee im Frühling schmilzt "
        "und durch die Kiefernwälder hinunterläuft. Jeden Morgen öffnet die Bäckerin den Laden."
    )
    step = LanguageFilter()
    out = list(step.run([Document("en", CLEAN), Document("de", german), Document("num", "12 34 56 ++ --")]))
    assert [d.id for d in out] == ["en"]
    assert out[0].meta["language"] == "en" and out[0].meta["language_score"] > 0.9
    assert step.stats.removed["language_de"] == 1 and sum(step.stats.removed.values()) == 2
    both = LanguageFilter(LanguageFilter.Params(languages=["en", "de"]))
    assert [d.id for d in both.run([Document("en", CLEAN), Document("de", german)])] == ["en", "de"]
    strict = LanguageFilter(LanguageFilter.Params(languages=["en"], min_score=1.0))
    assert (
        list(strict.run([Document("en", "ok then")])) == [] and "low_language_score" in strict.stats.removed
    )
    with pytest.raises(ValueError, match="unknown language code"):
        LanguageFilter.Params(languages=["english"])
