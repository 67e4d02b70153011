"""The whole pipeline on a planted corpus: duplicates found with precision and recall >= 0.95, junk
removed by the rule meant for it, clean distinct documents all kept; corrupt inputs counted while
the rest is processed; a crashed run resumes without redoing finished parts; shards round-trip."""

from __future__ import annotations

import gzip
import json
import random

import pytest
import zstandard

from dsv3.config import ConfigError
from dsv3.data import pipeline as pipeline_mod
from dsv3.data.dedup import word_shingles
from dsv3.data.pipeline import run_pipeline
from dsv3.data.pipeline_config import load_pipeline_config, pipeline_config_from_dict
from dsv3.data.readers import iter_documents


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


NOUNS = _words(
    "river hill town snow spring wood mill boat baker shop oven flour dough street customer door "
    "library book room hall reader desk librarian cushion tool job train coast station valley child "
    "window sea tunnel garden tomato bean fence lettuce pumpkin path clock square watch storm "
    "fisherman shingle ring wall wave harbour museum map instrument star globe planet wire bread "
    "water salt yeast farmer field horse cart market bridge tower bell village teacher school lesson "
    "letter painter canvas colour kitchen table chair lamp candle forest fox owl mountain lake island "
    "ship sailor captain island engine wheel road traveller inn song singer drum king castle gate "
    "guard soldier doctor patient nurse city dog cat bird nest egg apple tree leaf root seed cloud "
    "rain wind sun moon evening morning night winter summer autumn week year friend neighbour brother "
    "sister mother father"
)
VERBS = _words(
    "opens closes carries finds watches builds paints cleans follows reaches crosses fills leaves "
    "visits mends sells buys brings takes keeps moves lifts pushes pulls draws writes reads counts "
    "guards feeds warms cools shows hides covers marks measures"
)
ADJECTIVES = _words(
    "old new quiet busy small large cold warm dark bright narrow wide heavy light early late green "
    "grey red blue golden silver wooden stone broken careful patient hungry tired happy sleepy "
    "distant nearby hidden ancient modern simple strange gentle"
)
ADVERBS = _words("slowly quickly quietly carefully gladly rarely often always sometimes suddenly")
PREPS = _words("near behind above below across through beside under beyond toward")
BOILERPLATE = (
    "Copyright the authors. All rights reserved. Share this story with your friends, and "
    "subscribe to our weekly newsletter for more stories like this one."
)


def _sentence(rng: random.Random) -> str:
    a, n, v = rng.choice, NOUNS, VERBS
    forms = [
        f"The {a(ADJECTIVES)} {a(n)} {a(v)} the {a(n)} {a(PREPS)} the {a(ADJECTIVES)} {a(n)}.",
        f"Every {a(n)} {a(ADVERBS)} {a(v)} a {a(ADJECTIVES)} {a(n)} and the {a(n)} {a(v)} it to the {a(n)}.",
        f"In the {a(ADJECTIVES)} {a(n)}, the {a(n)} {a(v)} the {a(n)} of the {a(n)} with a {a(n)}.",
        f"A {a(n)} that {a(v)} the {a(n)} will {a(ADVERBS)} find the {a(ADJECTIVES)} {a(n)} "
        f"{a(PREPS)} the {a(n)}.",
    ]
    return a(forms)


def _document(rng: random.Random, sentences: int = 36) -> list[str]:
    return [_sentence(rng) for _ in range(sentences)]


def _paragraphs(sentences: list[str]) -> str:
    return "\n".join(" ".join(sentences[i : i + 6]) for i in range(0, len(sentences), 6))


def _jaccard(a: str, b: str) -> float:
    x, y = word_shingles(a), word_shingles(b)
    return len(x & y) / len(x | y)


def planted_corpus(seed: int = 0):
    """Records plus the truth: which documents are planted duplicates (of what) and which are junk."""
    rng = random.Random(seed)
    originals = [_document(rng) for _ in range(160)]
    records, truth = [], {}
    for i, sentences in enumerate(originals):
        records.append({"id": f"orig-{i}", "text": _paragraphs(sentences), "meta": {"kind": "clean"}})
        truth[f"orig-{i}"] = ("clean", None)
    for i, sentences in enumerate(originals[:120]):
        variant = list(sentences)
        kind = ("exact", "words", "reorder", "boilerplate", "mixed")[i % 5]
        if kind == "exact":  # only case and spacing differ
            text = "  ".join(_paragraphs(variant).upper().split(" "))
        else:
            if kind in ("words", "mixed"):  # a few words changed
                words = _paragraphs(variant).split(" ")
                for pos in rng.sample(range(len(words)), 3):
                    words[pos] = rng.choice(NOUNS)
                variant = " ".join(words).split(". ")
                variant = [s if s.endswith(".") else s + "." for s in variant]
            if kind in ("reorder", "mixed"):  # two sentences swap places
                k = rng.randrange(len(variant) - 1)
                variant[k], variant[k + 1] = variant[k + 1], variant[k]
            text = _paragraphs(variant)
            if kind in ("boilerplate", "mixed"):
                text += "\n" + BOILERPLATE
        records.append({"id": f"dup-{i}-{kind}", "text": text, "meta": {"kind": kind}})
        truth[f"dup-{i}-{kind}"] = ("exact" if kind == "exact" else "near", f"orig-{i}")
    for i, sentences in enumerate(originals[120:150]):  # hard negatives: share a third of an original
        text = _paragraphs(sentences[:12] + _document(rng, 24))
        records.append({"id": f"partial-{i}", "text": text, "meta": {"kind": "partial"}})
        truth[f"partial-{i}"] = ("clean", None)
    html = _paragraphs(_document(rng))
    page = (
        "<!doctype html><html><head><title>Story</title><script>var t = 1;</script></head><body><nav>"
        "<a href='/'>Home</a> <a href='/b'>Blog</a></nav><article>"
        + "".join(f"<p>{p}</p>" for p in html.split("\n"))
        + "</article><footer>© 2024</footer></body></html>"
    )
    junk = {
        "html-page": (page, "clean"),
        "html-menu": (
            "<html><body><nav><a href='/'>Home</a> <a href='/x'>Shop</a></nav>"
            "<script>track()</script></body></html>",
            "02_html_to_text",
        ),
        "repeated-lines": (
            "\n".join(
                ["Buy cheap shoes today and save money with our offer."] * 12
                + [_paragraphs(_document(rng, 12))]
            ),
            "06_gopher_repetition",
        ),
        "german": (
            " ".join(
                [
                    "Der alte Müller öffnet am Morgen die Tür der Mühle, und die Kinder laufen über "
                    "die Brücke zum Markt, wo der Bäcker frisches Brot verkauft."
                ]
                * 1
                + [
                    "Im Winter liegt Schnee auf den Dächern, und die Leute sitzen am warmen Ofen "
                    "und erzählen Geschichten aus alten Zeiten."
                ]
                * 1
                + [
                    "Der Fluss fließt langsam durch das Tal, und am Abend singen die Vögel in "
                    "den hohen Bäumen am Ufer des Sees."
                ]
                * 1
            ),
            "05_language",
        ),
        "lorem": (
            "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " + _paragraphs(_document(rng, 12)),
            "04_c4_quality",
        ),
    }
    for name, (text, fate) in junk.items():
        records.append({"id": name, "text": text, "meta": {"kind": "junk"}})
        truth[name] = ("clean", None) if fate == "clean" else ("junk", fate)
    rng.shuffle(records)
    # originals must come first in input order for the keep rule: put every original before its copies
    records.sort(key=lambda r: not r["id"].startswith("orig-"))
    return records, truth, originals


PIPELINE = {
    "name": "planted",
    "steps": [
        "fix_unicode",
        {"html_to_text": None},
        "normalize_whitespace",
        {"c4_quality": {"terminal_punctuation": False, "min_sentences": 3}},
        {"language": {"languages": ["en"], "min_score": 0.8}},
        {"gopher_repetition": None},
        {"gopher_quality": None},
    ],
    "dedup": {"minhash": {"threshold": 0.7}},
}


def _write_jsonl_zst(path, records):
    path.write_bytes(
        zstandard.ZstdCompressor().compress(b"".join(json.dumps(r).encode() + b"\n" for r in records))
    )


def _config(tmp_path, inputs, **extra):
    return pipeline_config_from_dict(
        {**PIPELINE, "inputs": inputs, "output": str(tmp_path / "out"), **extra}, "test.yaml"
    )


def _rejects(out, step):
    found = []
    for path in sorted((out / "rejects" / step).glob("*.jsonl.zst")):
        found += [json.loads(line) for line in zstandard.open(path, "rt", encoding="utf-8")]
    return found


def test_planted_duplicates_and_junk(tmp_path):
    records, truth, originals = planted_corpus()
    # sanity of the planted set itself: near copies are near (J >= 0.8), hard negatives are not
    text_of = {r["id"]: r["text"] for r in records}
    for doc_id, (kind, original) in truth.items():
        if kind == "near":
            assert _jaccard(text_of[doc_id], text_of[original]) >= 0.8, doc_id
    for i in range(30):
        assert _jaccard(text_of[f"partial-{i}"], text_of[f"orig-{120 + i}"]) < 0.5

    _write_jsonl_zst(tmp_path / "a.jsonl.zst", records[: len(records) // 2])
    _write_jsonl_zst(tmp_path / "b.jsonl.zst", records[len(records) // 2 :])
    cfg = _config(tmp_path, [{"path": str(tmp_path / "*.jsonl.zst"), "split": 2}])
    report = run_pipeline(cfg)
    out = tmp_path / "out"

    kept = {d.id: d for path in sorted((out / "documents").glob("*.jsonl.zst")) for d in iter_documents(path)}
    clean = {doc_id for doc_id, (kind, _) in truth.items() if kind == "clean"}
    assert clean <= set(kept), f"clean documents removed: {sorted(clean - set(kept))}"
    assert "<" not in kept["html-page"].text and "Home" not in kept["html-page"].text

    removed = {r["id"]: r for r in _rejects(out, "08_dedup")}
    planted = {doc_id for doc_id, (kind, _) in truth.items() if kind in ("exact", "near")}
    near = {doc_id for doc_id, (kind, _) in truth.items() if kind == "near"}
    precision = len(set(removed) & planted) / len(removed)
    recall = len(set(removed) & planted) / len(planted)
    near_recall = len(set(removed) & near) / len(near)
    assert precision >= 0.95 and recall >= 0.95 and near_recall >= 0.95, (precision, recall, near_recall)
    for doc_id in set(removed) & planted:  # each removed copy names the original it duplicates
        assert removed[doc_id]["duplicate_of"] == truth[doc_id][1]
        assert removed[doc_id]["reason"] == truth[doc_id][0]

    for doc_id, (kind, step) in truth.items():
        if kind == "junk":
            assert doc_id not in kept
            assert doc_id in {r["id"] for r in _rejects(out, step)}, (doc_id, step)

    steps = {s["name"]: s for s in report["steps"]}
    assert steps["00_read"]["docs_in"] == len(records)
    assert steps["08_dedup"]["docs_out"] == len(kept) == report["documents"]["count"]
    assert report["dedup"]["removed"] == len(removed)
    assert report["dedup"]["exact_removed"] == sum(r["reason"] == "exact" for r in removed.values())
    assert json.loads((out / "report.json").read_text())["documents"]["count"] == len(kept)
    assert not (out / ".work").exists()


def test_corrupt_inputs_are_reported_and_everything_else_processed(tmp_path):
    records, _, _ = planted_corpus(seed=1)
    good = records[:40]
    lines = [json.dumps(r).encode() for r in good[:20]]
    lines.insert(5, b'{"id": "broken", "text": "no end')
    lines.insert(9, b'{"id": "latin1", "text": "caf\xe9 au lait"}')
    lines.insert(12, b'{"id": "no-text", "body": "misnamed field"}')
    (tmp_path / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    whole = gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in good[20:]))
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: int(len(whole) * 0.8)])
    (tmp_path / "empty.jsonl").write_bytes(b"")
    cfg = _config(tmp_path, [{"path": str(tmp_path)}], steps=["normalize_whitespace"], dedup=None)
    report = run_pipeline(cfg)
    read = report["steps"][0]
    assert read["removed"] == {
        "bad_json": 1,
        "not_utf8": 1,
        "missing_text": 1,
        "truncated": 1,
        "empty_file": 1,
    }
    kept = [d.id for p in sorted((tmp_path / "out" / "documents").glob("*")) for d in iter_documents(p)]
    assert set(kept) >= {r["id"] for r in good[:20]} and len(kept) > 20  # the cut file's head too
    rejected = _rejects(tmp_path / "out", "00_read")
    assert {r["source"].rsplit("/", 1)[-1] for r in rejected} >= {
        "mixed.jsonl:6",
        "mixed.jsonl:10",
        "mixed.jsonl:13",
        "empty.jsonl",
    }


def test_resume_skips_finished_parts_and_matches_a_clean_run(tmp_path, monkeypatch):
    records, _, _ = planted_corpus(seed=2)
    _write_jsonl_zst(tmp_path / "in.jsonl.zst", records)
    inputs = [{"path": str(tmp_path / "in.jsonl.zst"), "split": 3}]
    calls: list[str] = []
    real = pipeline_mod.filter_part

    def crashing(cfg, part, layout):
        calls.append(part.name)
        if part.name == "part-00001" and len(calls) < 3:
            raise RuntimeError("simulated crash")
        return real(cfg, part, layout)

    monkeypatch.setattr(pipeline_mod, "filter_part", crashing)
    cfg = _config(tmp_path, inputs)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_pipeline(cfg)
    assert calls == ["part-00000", "part-00001"]
    report = run_pipeline(cfg)
    assert calls[2:] == ["part-00001", "part-00002"]  # part-00000 was not redone
    assert report["resumed"]

    fresh = _config(tmp_path, inputs, output=str(tmp_path / "fresh"))
    monkeypatch.setattr(pipeline_mod, "filter_part", real)
    expected = run_pipeline(fresh)
    read = lambda root: [
        (d.id, d.text) for p in sorted((root / "documents").glob("*")) for d in iter_documents(p)
    ]
    assert read(tmp_path / "out") == read(tmp_path / "fresh")
    untimed = lambda rows: [{k: v for k, v in row.items() if k != "seconds"} for row in rows]
    assert untimed(report["steps"]) == untimed(expected["steps"])
    assert untimed([report["dedup"]]) == untimed([expected["dedup"]])
    again = run_pipeline(cfg)  # everything finished: nothing is redone
    assert len(calls) == 4 and again["documents"] == report["documents"]


def test_output_folder_guards(tmp_path):
    records, _, _ = planted_corpus(seed=3)
    _write_jsonl_zst(tmp_path / "in.jsonl.zst", records[:30])
    inputs = [{"path": str(tmp_path / "in.jsonl.zst")}]
    run_pipeline(_config(tmp_path, inputs))
    changed = _config(tmp_path, inputs, steps=["fix_unicode"])
    with pytest.raises(ConfigError, match=r"holds a run of a different pipeline \(changed: steps\)"):
        run_pipeline(changed)
    (tmp_path / "other" / "documents").mkdir(parents=True)
    (tmp_path / "other" / "documents" / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=r"other: already holds documents but no record of the run"):
        run_pipeline(_config(tmp_path, inputs, output=str(tmp_path / "other")))
    (tmp_path / "shared" / "raw").mkdir(parents=True)  # unrelated files may share the output folder
    run_pipeline(_config(tmp_path, inputs, output=str(tmp_path / "shared")))
    assert (tmp_path / "shared" / "raw").is_dir() and (tmp_path / "shared" / "report.json").is_file()


def test_config_errors_name_the_file_and_key(tmp_path):
    path = tmp_path / "p.yaml"
    base = "inputs: [{path: x.jsonl}]\noutput: out\n"
    cases = {
        "steps: [gopher]": r"p\.yaml: steps\[0\]: unknown step 'gopher' \(known: fix_unicode",
        "steps: [{gopher_quality: {min_wrds: 3}}]": r"p\.yaml: steps\[0\]\.gopher_quality: min_wrds: unknown",
        "steps: [{language: {min_score: 2}}]": r"steps\[0\]\.language: min_score: Input should be less than",
        "dedup: {minhash: {bands: 3}}": r"p\.yaml: dedup\.minhash: bands \* rows must equal num_perm",
        "colour: blue": r"p\.yaml: colour: unknown key",
        "tokenize: {tokenizer: t.json, train: {vocab_size: 100}}": r"tokenize: .*tokenizer\.json",
    }
    for body, pattern in cases.items():
        path.write_text(base + body + "\n")
        with pytest.raises(ConfigError, match=pattern):
            load_pipeline_config(path)
    path.write_text(base + "steps: [fix_unicode]\n")
    cfg = load_pipeline_config(
        path, ["dedup.minhash.threshold=0.8"], inputs=["a.jsonl", "b.parquet"], output="elsewhere", workers=3
    )
    assert [i.path for i in cfg.inputs] == ["a.jsonl", "b.parquet"] and cfg.output == "elsewhere"
    assert cfg.workers == 3 and cfg.dedup.minhash.threshold == 0.8


def test_tokenize_stage_trains_a_tokenizer_and_writes_shards_that_decode(tmp_path):
    from dsv3.data.shards import IndexedDataset
    from dsv3.data.tokenizer import load_tokenizer

    records, _, _ = planted_corpus(seed=4)
    _write_jsonl_zst(tmp_path / "in.jsonl.zst", records[:60])
    cfg = _config(
        tmp_path,
        [{"path": str(tmp_path / "in.jsonl.zst"), "split": 2}],
        steps=[],
        dedup=None,
        output_format="parquet",
        tokenize={
            "tokenizer": str(tmp_path / "tok"),
            "train": {"vocab_size": 400},
            "valid_fraction": 0.2,
            "output": "shards",
        },
    )
    report = run_pipeline(cfg)
    tokenizer = load_tokenizer(tmp_path / "tok" / "tokenizer.json")
    assert report["tokenizer"]["trained"] and report["tokenizer"]["vocab_size"] == 400
    eos = report["tokenizer"]["eos"]
    texts = {r["id"]: r["text"] for r in records[:60]}
    decoded = []
    for split in ("train", "valid"):
        for prefix in sorted((tmp_path / "out" / "shards" / split).glob("*.idx")):
            ds = IndexedDataset(prefix.with_suffix(""))
            for i in range(len(ds)):
                tokens = ds[i].tolist()
                assert tokens[-1] == eos and eos not in tokens[:-1]
                decoded.append(tokenizer.decode(tokens[:-1]))
    assert sorted(decoded) == sorted(texts.values())
    assert report["shards"]["train"]["documents"] + report["shards"]["valid"]["documents"] == 60
    assert 0 < report["shards"]["valid"]["documents"] < 30
    assert len(list((tmp_path / "out" / "documents").glob("part-*.parquet"))) == 2

    everything_removed = [{"gopher_quality": {"min_words": 100_000}}]
    tokenize = {"tokenizer": str(tmp_path / "t2"), "train": {"vocab_size": 400}}
    nothing = _config(
        tmp_path,
        cfg.model_dump()["inputs"],
        steps=everything_removed,
        dedup=None,
        output=str(tmp_path / "empty"),
        tokenize=tokenize,
    )
    with pytest.raises(ConfigError, match="no document survived the pipeline to train"):
        run_pipeline(nothing)
