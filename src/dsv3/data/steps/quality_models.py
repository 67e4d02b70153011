"""Model-based quality filters: a fastText classifier score and a KenLM perplexity, each loading a
model file the user provides (`pip install 'dsv3[fasttext]'` / `'dsv3[kenlm]'`).

- fastText (Joulin et al. 2017) quality classifiers are how GPT-3, LLaMA and FineWeb-Edu-style
  pipelines keep "reference-like" text: documents whose probability for `label` is below
  `min_score` are removed.
- KenLM perplexity follows CCNet (Wenzek et al. 2020): a language model trained on a clean
  reference corpus (Wikipedia) scores every line; the document's perplexity is
  10^(-sum of log10 probabilities / number of tokens), tokens counting each line's end. CCNet
  has no universal cut-off: it splits each language at the 33rd and 66th percentiles of its own
  distribution, so `max_perplexity` must come from the user's data.

A missing package or model file is one ConfigError line saying what to install or provide,
raised when the step is built (before any data is read).

Public API: `FastTextFilter`, `KenLMFilter`, `kenlm_perplexity`.
"""

from __future__ import annotations

import functools
import importlib
import re
import unicodedata
from pathlib import Path

from pydantic import Field

from dsv3.config import ConfigError
from dsv3.data.document import Document, Step, StepParams

__all__ = ["FastTextFilter", "KenLMFilter", "kenlm_perplexity"]


def _require(module: str, step: str, extra: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"step {step} needs the {module} package: pip install 'dsv3[{extra}]'") from None


def _model_file(path: str, step: str, hint: str) -> Path:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"step {step}: model_path {file}: no such file ({hint})")
    return file


@functools.lru_cache(maxsize=4)
def _load_fasttext(path: str):
    fasttext = _require("fasttext", "fasttext_quality", "fasttext")
    fasttext.FastText.eprint = lambda *args, **kwargs: None  # silence its load_model deprecation notice
    try:
        return fasttext.load_model(path)
    except ValueError as e:
        raise ConfigError(f"step fasttext_quality: model_path {path}: not a fastText model ({e})") from None


class FastTextParams(StepParams):
    model_path: str = Field(description="a fastText supervised model (.bin or .ftz)")
    label: str = Field(default="__label__hq", description="the label whose probability is the quality score")
    min_score: float = Field(default=0.5, ge=0, le=1, description="documents scoring lower are removed")
    max_chars: int | None = Field(default=100_000, ge=1, description="score only the first N characters")
    meta_key: str = Field(default="quality_score", description="where kept documents record their score")


class FastTextFilter(Step):
    """Remove documents a fastText classifier scores below `min_score` for `label`."""

    type = "fasttext_quality"
    Params = FastTextParams

    def __init__(self, params: FastTextParams):
        super().__init__(params)
        _require("fasttext", self.type, "fasttext")
        hint = "train one with fasttext.train_supervised on labelled examples"
        file = _model_file(params.model_path, self.type, hint)
        self._model = _load_fasttext(str(file.resolve()))
        labels = list(self._model.labels)
        if params.label not in labels:
            raise ConfigError(f"step {self.type}: label {params.label!r} is not one of the model's {labels}")

    def score(self, text: str) -> float:
        """Probability of `label` (fastText reads one line: newlines become spaces)."""
        text = text[: self.params.max_chars].replace("\n", " ")
        labels, probs = self._model.predict(text, k=-1)
        return float(dict(zip(labels, probs, strict=True)).get(self.params.label, 0.0))

    def process(self, doc: Document) -> Document | str:
        score = self.score(doc.text)
        if score < self.params.min_score:
            return "low_quality_score"
        doc.meta[self.params.meta_key] = round(score, 4)
        return doc


@functools.lru_cache(maxsize=4)
def _load_kenlm(path: str):
    kenlm = _require("kenlm", "kenlm_perplexity", "kenlm")
    try:
        return kenlm.Model(path)
    except OSError as e:
        raise ConfigError(
            f"step kenlm_perplexity: model_path {path}: not a KenLM model ({str(e).splitlines()[0][:200]})"
        ) from None


_DIGITS = re.compile(r"\d")
_MARKS = re.compile(r"[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]")  # combining marks


def _ccnet_normalize(line: str) -> str:
    """CCNet's normalisation before scoring: lowercase, accents stripped, digits as 0."""
    line = line.lower()
    if not line.isascii():
        line = _MARKS.sub("", unicodedata.normalize("NFD", line))
    return _DIGITS.sub("0", line)


def kenlm_perplexity(model, text: str, normalize: bool = True) -> float:
    """Perplexity of `text` under a KenLM model, line by line with sentence boundaries (CCNet)."""
    log10_sum, tokens = 0.0, 0
    for line in text.split("\n"):
        line = " ".join(line.split())
        if not line:
            continue
        if normalize:
            line = _ccnet_normalize(line)
        log10_sum += model.score(line, bos=True, eos=True)
        tokens += len(line.split()) + 1  # + the end of sentence
    return 10.0 ** (-log10_sum / tokens) if tokens else float("inf")


class KenLMParams(StepParams):
    model_path: str = Field(description="a KenLM model: ARPA text or KenLM binary")
    max_perplexity: float = Field(gt=0, description="documents above are removed; no universal default")
    min_perplexity: float | None = Field(default=None, gt=0, description="documents below are removed")
    normalize: bool = Field(default=True, description="CCNet's lowercase/accents/digits normalisation")
    meta_key: str = "perplexity"


class KenLMFilter(Step):
    """Remove documents whose KenLM perplexity lies outside [min_perplexity, max_perplexity]."""

    type = "kenlm_perplexity"
    Params = KenLMParams

    def __init__(self, params: KenLMParams):
        super().__init__(params)
        _require("kenlm", self.type, "kenlm")
        hint = "build one with KenLM's lmplz on a reference corpus, or use CCNet's released models"
        file = _model_file(params.model_path, self.type, hint)
        self._model = _load_kenlm(str(file.resolve()))

    def process(self, doc: Document) -> Document | str:
        p = self.params
        ppl = kenlm_perplexity(self._model, doc.text, p.normalize)
        if ppl > p.max_perplexity:
            return "high_perplexity"
        if p.min_perplexity is not None and ppl < p.min_perplexity:
            return "low_perplexity"
        doc.meta[p.meta_key] = round(ppl, 2)
        return doc
