"""Cleaning steps: unicode repair, HTML to main text, whitespace and control characters, PII."""

from __future__ import annotations

import unicodedata

from dsv3.data.document import Document
from dsv3.data.steps.clean import FixUnicode, HtmlToText, NormalizeWhitespace, ScrubPII, scrub_pii


def _run(step, *texts):
    docs = [Document(id=str(i), text=t) for i, t in enumerate(texts)]
    return [d.text for d in step.run(docs)]


def test_fix_unicode_repairs_mojibake_and_normalises_to_nfc():
    decomposed = unicodedata.normalize("NFD", "café naïve")
    step = FixUnicode()
    out = _run(step, "The cafÃ© is open âœ” today", decomposed, "x = '&lt;' if a & b else y")
    assert out[0] == "The café is open ✔ today"
    assert out[1] == "café naïve" and unicodedata.is_normalized("NFC", out[1])
    assert out[2] == "x = '&lt;' if a & b else y"  # code that spells entities is left alone
    assert step.stats.modified == 2 and step.stats.docs_out == 3


def test_html_pages_become_their_main_text_and_other_text_passes():
    page = (
        "<!doctype html><html><head><title>x</title><script>var tracking = 1;</script></head><body>"
        "<nav><a href='/'>Home</a> | <a href='/about'>About</a></nav><article><h1>Bread</h1>"
        "<p>To make bread you need flour, water, salt &amp; yeast.</p><p>Knead it well.</p></article>"
        "<footer>Copyright 2024</footer></body></html>"
    )
    code = "if a < b and c > d:\n    print('<p>')\n"
    nav_only = "<html><body><nav><a href='/'>Home</a></nav><script>x()</script></body></html>"
    step = HtmlToText()
    out = list(step.run([Document("page", page), Document("code", code), Document("nav", nav_only)]))
    text = out[0].text
    assert "To make bread you need flour, water, salt & yeast." in text and "Knead it well." in text
    assert "<" not in text and "tracking" not in text and "Home" not in text
    assert out[1].text == code  # not HTML: untouched
    assert [d.id for d in out] == ["page", "code"] and dict(step.stats.removed) == {"empty_after_cleaning": 1}


def test_normalize_whitespace_keeps_indentation():
    text = "\ufeffdef f(x):\r\n    return\u00a0x\x07  \r\n\n\n\n\n# done\u200b\t \n\n"
    out = _run(NormalizeWhitespace(), text)[0]
    assert out == "def f(x):\n    return x\n\n\n# done"
    assert (
        _run(
            NormalizeWhitespace(NormalizeWhitespace.Params(collapse_spaces=True, max_blank_lines=0)),
            "a   b\n\n\n  c  d",
        )[0]
        == "a b\n  c d"
    )


def test_pii_is_replaced_by_placeholders():
    text = (
        "Write to jane.doe+news@example.co.uk or call +1 415-555-0132 / (030) 1234 5678; "
        "server 192.168.0.17 and fe80:0:0:0:202:b3ff:fe1e:8329. Version 3.11.7 and 1999."
    )
    out = scrub_pii(text)
    assert out == (
        "Write to <EMAIL> or call <PHONE> / <PHONE>; server <IP> and <IP>. Version 3.11.7 and 1999."
    )
    assert scrub_pii("not an ip: 999.1.1.1, 1.2.3.4.5") == "not an ip: 999.1.1.1, 1.2.3.4.5"
    step = ScrubPII(ScrubPII.Params(phone=None, ip="[ip]"))
    assert _run(step, "a@b.org 10.0.0.1 +1 415-555-0132") == ["<EMAIL> [ip] +1 415-555-0132"]
