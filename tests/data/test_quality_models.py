"""Model-based filters with small real models: a fastText classifier kept as a 2.4 KB fixture, and a
KenLM bigram model written as ARPA text whose perplexities are computed here by hand."""

from __future__ import annotations

import importlib
import math

import fasttext
import kenlm
import pytest

from dsv3.config import ConfigError
from dsv3.data.document import Document
from dsv3.data.steps import quality_models
from dsv3.data.steps.quality_models import FastTextFilter, KenLMFilter, kenlm_perplexity
from tests.conftest import FIXTURES


def test_fasttext_filter_keeps_what_the_classifier_scores_high():
    # A classifier of plain sentences (__label__hq) vs spam (__label__lq), made once by
    # tests/fixtures/make_fasttext_model.py: fastText's training aborts at random on NaN, while
    # loading and predicting are deterministic.
    model_path = str(FIXTURES / "fasttext_quality.bin")
    model = fasttext.load_model(model_path)
    step = FastTextFilter(FastTextFilter.Params(model_path=model_path, min_score=0.5))
    docs = [
        Document("good", "the baker opens the shop\nin the morning at six"),
        Document("spam", "click here, free free free, buy now"),
        Document("good2", "books in the reading hall of the library"),
    ]
    kept = list(step.run(docs))
    assert [d.id for d in kept] == ["good", "good2"]
    labels, probs = model.predict("the baker opens the shop in the morning at six", k=-1)
    expected = dict(zip(labels, probs, strict=True))["__label__hq"]
    assert kept[0].meta["quality_score"] == pytest.approx(expected, abs=1e-4)
    assert dict(step.stats.removed) == {"low_quality_score": 1}
    with pytest.raises(ConfigError, match=r"label '__label__good' is not one of the model's"):
        FastTextFilter(FastTextFilter.Params(model_path=model_path, label="__label__good"))


ARPA = """
\\data\\
ngram 1=5
ngram 2=3

\\1-grams:
-1.0\t<unk>\t0
-99\t<s>\t-0.30
-0.7\t</s>\t0
-0.5\tthe\t-0.2
-0.6\tcat\t-0.1

\\2-grams:
-0.2\t<s> the
-0.3\tthe cat
-0.4\tcat </s>

\\end\\
"""


def _by_hand(text: str) -> float:
    """Bigram backoff perplexity from the ARPA above: log10 p(w|h) = bigram, else backoff(h) + p(w)."""
    uni = {
        "<unk>": (-1.0, 0.0),
        "<s>": (-99.0, -0.30),
        "</s>": (-0.7, 0.0),
        "the": (-0.5, -0.2),
        "cat": (-0.6, -0.1),
    }
    bi = {("<s>", "the"): -0.2, ("the", "cat"): -0.3, ("cat", "</s>"): -0.4}
    total, tokens = 0.0, 0
    for line in text.split("\n"):
        words = ["<s>"] + [w if w in uni else "<unk>" for w in line.split()] + ["</s>"]
        for h, w in zip(words, words[1:], strict=False):
            total += bi[(h, w)] if (h, w) in bi else uni[h][1] + uni[w][0]
            tokens += 1
    return 10 ** (-total / tokens)


def test_kenlm_perplexity_matches_the_arpa_by_hand(tmp_path):
    (tmp_path / "lm.arpa").write_text(ARPA)
    model = kenlm.Model(str(tmp_path / "lm.arpa"))
    for text in ("the cat", "cat the", "The CAT\ncat cat the", "the dog"):
        assert kenlm_perplexity(model, text) == pytest.approx(_by_hand(text.lower()), rel=1e-4), text
    assert _by_hand("the cat") == pytest.approx(10**0.3)

    step = KenLMFilter(KenLMFilter.Params(model_path=str(tmp_path / "lm.arpa"), max_perplexity=3.0))
    kept = list(step.run([Document("fluent", "the cat"), Document("odd", "cat the the cat cat")]))
    assert [d.id for d in kept] == ["fluent"] and kept[0].meta["perplexity"] == pytest.approx(
        10**0.3, abs=0.01
    )
    assert dict(step.stats.removed) == {"high_perplexity": 1}
    low = KenLMFilter(
        KenLMFilter.Params(model_path=str(tmp_path / "lm.arpa"), max_perplexity=100, min_perplexity=3)
    )
    assert list(low.run([Document("fluent", "the cat")])) == [] and "low_perplexity" in low.stats.removed


def test_missing_model_file_or_package_is_one_clear_line(tmp_path, monkeypatch):
    with pytest.raises(
        ConfigError, match=r"fasttext_quality: model_path .*nope\.bin: no such file \(train one"
    ):
        FastTextFilter(FastTextFilter.Params(model_path=str(tmp_path / "nope.bin")))
    with pytest.raises(ConfigError, match=r"kenlm_perplexity: model_path .*nope\.arpa: no such file"):
        KenLMFilter(KenLMFilter.Params(model_path=str(tmp_path / "nope.arpa"), max_perplexity=10))
    (tmp_path / "junk.arpa").write_text("not a language model")
    with pytest.raises(ConfigError, match="not a KenLM model"):
        KenLMFilter(KenLMFilter.Params(model_path=str(tmp_path / "junk.arpa"), max_perplexity=10))

    real = importlib.import_module

    def without(name, *args):
        if name in ("fasttext", "kenlm"):
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(quality_models.importlib, "import_module", without)
    with pytest.raises(ConfigError, match=r"needs the fasttext package: pip install 'dsv3\[fasttext\]'"):
        FastTextFilter(FastTextFilter.Params(model_path="x.bin"))
    with pytest.raises(ConfigError, match=r"needs the kenlm package: pip install 'dsv3\[kenlm\]'"):
        KenLMFilter(KenLMFilter.Params(model_path="x.arpa", max_perplexity=1))
    assert math.isinf(kenlm_perplexity(None, "\n \n"))
