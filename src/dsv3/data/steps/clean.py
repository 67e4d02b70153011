"""Cleaning steps: they rewrite text and only remove a document that cleaning leaves empty.

- `fix_unicode`: ftfy repairs mojibake and broken escapes, then Unicode NFC.
- `html_to_text`: HTML pages to their main text with resiliparse (documents that do not start
  with a tag pass untouched, so code that mentions `<p>` is safe).
- `normalize_whitespace`: drops control characters, unifies line ends and exotic spaces, strips
  trailing spaces and collapses blank-line runs, keeping indentation (code stays valid).
- `pii`: e-mail addresses, IP addresses and phone numbers replaced by placeholders.

Public API: `FixUnicode`, `HtmlToText`, `NormalizeWhitespace`, `ScrubPII`, `scrub_pii`,
`looks_like_html`.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import replace

from pydantic import Field

from dsv3.data.document import Document, Step, StepParams

__all__ = ["FixUnicode", "HtmlToText", "NormalizeWhitespace", "ScrubPII", "scrub_pii", "looks_like_html"]


def _rewritten(doc: Document, text: str) -> Document | str:
    if text is doc.text or text == doc.text:
        return doc
    return replace(doc, text=text) if text.strip() else "empty_after_cleaning"


class FixUnicodeParams(StepParams):
    normalization: str = Field(default="NFC", pattern="^(NFC|NFKC)$")
    uncurl_quotes: bool = Field(default=False, description="turn typographic quotes into ASCII ones")
    unescape_html: bool = Field(
        default=False,
        description="decode &amp; and friends (off: html_to_text handles real HTML, and code "
        "that spells entities must keep them)",
    )


class FixUnicode(Step):
    """ftfy's repair of mojibake ("cafÃ©" -> "café") and broken characters, then NFC (Speer 2019)."""

    type = "fix_unicode"
    Params = FixUnicodeParams

    def __init__(self, params: FixUnicodeParams | None = None):
        super().__init__(params)
        import ftfy

        self._config = ftfy.TextFixerConfig(
            uncurl_quotes=self.params.uncurl_quotes,
            normalization=self.params.normalization,
            unescape_html=self.params.unescape_html,
            fix_line_breaks=True,
        )
        self._fix = ftfy.fix_text

    def process(self, doc: Document) -> Document | str:
        text = doc.text
        if not text.isascii():  # ASCII has nothing to repair: most code skips ftfy's work
            text = unicodedata.normalize(self.params.normalization, self._fix(text, self._config))
        elif self.params.unescape_html and "&" in text:
            text = self._fix(text, self._config)
        return _rewritten(doc, text)


class HtmlToTextParams(StepParams):
    main_content: bool = Field(
        default=True, description="drop navigation, footers, ads (resiliparse heuristics)"
    )
    list_bullets: bool = True
    links: bool = False
    always: bool = Field(
        default=False, description="treat every document as HTML, not only those that look so"
    )


# A page starts with a tag (or doctype) and closes some tag; code that merely mentions "<p>" does not.
_STARTS_WITH_TAG = re.compile(r"\s*(?:<!--.*?-->\s*)*<(?:!doctype\b|[a-z])", re.I | re.S)
_CLOSING_TAG = re.compile(r"</[a-z][a-z0-9]*\s*>", re.I)


def looks_like_html(text: str) -> bool:
    """True for HTML pages and fragments: a leading tag and at least one closing tag."""
    return bool(_STARTS_WITH_TAG.match(text)) and _CLOSING_TAG.search(text) is not None


class HtmlToText(Step):
    """HTML to its readable main text with resiliparse (Bevendorff et al. 2018), keeping paragraphs."""

    type = "html_to_text"
    Params = HtmlToTextParams

    def __init__(self, params: HtmlToTextParams | None = None):
        super().__init__(params)
        from resiliparse.extract.html2text import extract_plain_text

        self._extract = extract_plain_text

    def process(self, doc: Document) -> Document | str:
        p = self.params
        if not p.always and not looks_like_html(doc.text):
            return doc
        text = self._extract(
            doc.text,
            preserve_formatting=True,
            main_content=p.main_content,
            list_bullets=p.list_bullets,
            links=p.links,
        )
        return _rewritten(doc, text)


class NormalizeWhitespaceParams(StepParams):
    max_blank_lines: int = Field(default=2, ge=0, description="longer runs of empty lines are shortened")
    collapse_spaces: bool = Field(
        default=False, description="runs of spaces inside lines to one (breaks code)"
    )


# C0/C1 controls except tab and newline, plus zero-width and bidi marks that render as nothing.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200e\u200f\u202a-\u202e\u2060\ufeff]")
_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_TRAILING = re.compile(r"[ \t]+$", re.M)
_INNER_SPACES = re.compile(r"(?<=\S)[ \t]{2,}")


class NormalizeWhitespace(Step):
    """Control characters out, CRLF and Unicode line/space separators unified, blank runs shortened."""

    type = "normalize_whitespace"
    Params = NormalizeWhitespaceParams

    def __init__(self, params: NormalizeWhitespaceParams | None = None):
        super().__init__(params)
        self._blank_run = re.compile(rf"\n{{{self.params.max_blank_lines + 2},}}")
        self._blank_to = "\n" * (self.params.max_blank_lines + 1)

    def process(self, doc: Document) -> Document | str:
        text = (
            doc.text.replace("\r\n", "\n")
            .replace("\r", "\n")
            .replace("\u2028", "\n")
            .replace("\u2029", "\n\n")
        )
        text = _CONTROL.sub("", text)
        text = _SPACES.sub(" ", text)
        text = _TRAILING.sub("", text)
        if self.params.collapse_spaces:
            text = _INNER_SPACES.sub(" ", text)
        text = self._blank_run.sub(self._blank_to, text).strip("\n")
        return _rewritten(doc, text)


_EMAIL = re.compile(r"\b[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w.]*\d)")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![\w:])")
# Phone numbers need separators or a leading +: bare digit runs are more often ids or numbers.
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}(?![\w-])"
    r"|(?<![\w+])\+\d{7,14}\b"
)


def scrub_pii(
    text: str, email: str | None = "<EMAIL>", ip: str | None = "<IP>", phone: str | None = "<PHONE>"
) -> str:
    """Replace e-mail addresses, IPv4/IPv6 addresses and phone numbers; None keeps that kind."""
    if email is not None and "@" in text:
        text = _EMAIL.sub(email, text)
    if ip is not None:
        text = _IPV6.sub(ip, _IPV4.sub(ip, text))
    if phone is not None:
        text = _PHONE.sub(phone, text)
    return text


class ScrubPIIParams(StepParams):
    email: str | None = Field(default="<EMAIL>", description="placeholder; null keeps e-mail addresses")
    ip: str | None = Field(default="<IP>", description="placeholder; null keeps IP addresses")
    phone: str | None = Field(default="<PHONE>", description="placeholder; null keeps phone numbers")


class ScrubPII(Step):
    """Personal data out, placeholders in (as in datatrove's PIIFormatter and The Stack's PII pass)."""

    type = "pii"
    Params = ScrubPIIParams

    def process(self, doc: Document) -> Document | str:
        p = self.params
        return _rewritten(doc, scrub_pii(doc.text, p.email, p.ip, p.phone))
