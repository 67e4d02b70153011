"""Language identification with py3langid (Lui & Baldwin 2012's langid.py, numpy port).

Scores are normalised probabilities over the candidate languages (`norm_probs=True`), so a
threshold means the same thing for every language. Kept documents get `meta.language` and
`meta.language_score`.

Public API: `LanguageFilter`, `identify_language`.
"""

from __future__ import annotations

import functools

from pydantic import Field, field_validator

from dsv3.data.document import Document, Step, StepParams

__all__ = ["LanguageFilter", "identify_language"]


@functools.lru_cache(maxsize=4)
def _identifier(candidates: tuple[str, ...] | None):
    from py3langid import langid

    identifier = langid.LanguageIdentifier.from_model_file(langid.MODEL_FILE, norm_probs=True)
    if candidates:
        identifier.set_languages(list(candidates))
    return identifier


def identify_language(text: str, candidates: tuple[str, ...] | None = None) -> tuple[str, float]:
    """(ISO 639-1 code, normalised probability) of the text's language."""
    lang, score = _identifier(candidates).classify(text)
    return lang, float(score)


class LanguageParams(StepParams):
    languages: list[str] = Field(default_factory=lambda: ["en"], description="allow-list of ISO 639-1 codes")
    min_score: float = Field(
        default=0.65,
        ge=0,
        le=1,
        description="minimum probability of the detected language (0.65: FineWeb's fastText threshold)",
    )
    candidates: list[str] | None = Field(
        default=None, description="restrict the classifier to these languages (None: all 97 it knows)"
    )
    max_chars: int = Field(default=10_000, ge=100, description="classify only the first N characters")

    @field_validator("languages", "candidates")
    @classmethod
    def _known(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        known = set(_identifier(None).labels)
        unknown = sorted(set(v) - known)
        if unknown:
            raise ValueError(
                f"unknown language code(s) {unknown} (py3langid knows {len(known)}, e.g. en, de, fr)"
            )
        return v


class LanguageFilter(Step):
    """Keep documents in the allowed languages whose detection score reaches `min_score`."""

    type = "language"
    Params = LanguageParams

    def __init__(self, params: LanguageParams | None = None):
        super().__init__(params)
        self._allowed = set(self.params.languages)
        self._candidates = tuple(self.params.candidates) if self.params.candidates else None
        _identifier(self._candidates)  # load the model now, not inside the first document's timing

    def process(self, doc: Document) -> Document | str:
        lang, score = identify_language(doc.text[: self.params.max_chars], self._candidates)
        if lang not in self._allowed:
            return f"language_{lang}"
        if score < self.params.min_score:
            return "low_language_score"
        doc.meta["language"], doc.meta["language_score"] = lang, round(score, 4)
        return doc
