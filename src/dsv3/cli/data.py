"""corpus, preprocess, tokenizer: raw documents → clean, deduplicated documents → shards (dsv3.data)."""

from __future__ import annotations

import argparse

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dsv3.cli.base import Formatter, command, console, err_console, positive, progress_bar

# --- corpus ----------------------------------------------------------------------------------


def _corpus_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="source", metavar="<source>", required=True)
    stdlib = sub.add_parser("stdlib", formatter_class=Formatter,
                            help="this Python's standard library: its code and docs cut into documents")
    stdlib.add_argument("--output", required=True, metavar="FILE.jsonl.zst", help="where the documents go")
    stdlib.add_argument("--kind", choices=["code", "prose", "all"], default="all", help="which documents")
    stdlib.add_argument("--limit", type=int, metavar="N", help="stop after N documents")
    stdlib.add_argument("--max-lines", type=int, default=20, help="longer definitions/docstrings are cut")


@command(
    "corpus", order=10, arguments=_corpus_arguments,
    summary="write a real local corpus (the Python standard library's code and docs) as jsonl.zst documents",
    example="dsv3 corpus stdlib --output data/stdlib.jsonl.zst --kind all",
)
def run_corpus(args: argparse.Namespace) -> int:
    from dsv3.data.corpus import iter_stdlib_documents, stdlib_root, write_jsonl_zst

    positive("--limit", args.limit)
    positive("--max-lines", args.max_lines)
    with progress_bar("cutting the standard library") as progress:
        task = progress.add_task("docs", total=args.limit)
        docs = iter_stdlib_documents(args.kind, args.limit, max_lines=args.max_lines)
        count = write_jsonl_zst((progress.advance(task) or doc for doc in docs), args.output)
    console.print(f"wrote {count:,} {args.kind} documents from {stdlib_root()} to [bold]{args.output}[/bold]",
                  highlight=False)
    return 0


# --- preprocess ------------------------------------------------------------------------------


def _preprocess_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, metavar="FILE", help="the pipeline YAML")
    p.add_argument("--input", nargs="+", metavar="PATH",
                   help="replace the YAML's inputs (files, globs, folders) with its first input's settings")
    p.add_argument("--output", metavar="DIR", help="replace the YAML's output folder")
    p.add_argument("--workers", type=int, metavar="N", help="processes working on parts in parallel")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key, e.g. dedup.minhash.threshold=0.7; repeatable, last wins")


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f}"


def _speed(t: dict) -> str:
    if "docs_per_s" in t:
        return f" ({t['docs_per_s']:,.0f} docs/s, {t['mb_per_s']:.2f} MB/s)"
    return " (done before)" if t.get("parts") == 0 else ""


def _print_preprocess_report(r: dict) -> None:
    table = Table(title=f"{r['name']}: {r['output']} ({r['parts']} parts, {r['workers']} workers)",
                  title_justify="left", show_edge=False)
    table.add_column("step", no_wrap=True)
    for col in ("docs in", "docs out", "MB in", "MB out", "changed"):
        table.add_column(col, justify="right", no_wrap=True)
    for s in r["steps"]:
        table.add_row(s["name"], f"{s['docs_in']:,}", f"{s['docs_out']:,}", _mb(s["bytes_in"]),
                      _mb(s["bytes_out"]), f"{s['modified']:,}")
    console.print(table)
    console.print("removed, by reason (all of them in report.json):")
    for s in r["steps"]:
        if s["removed"]:
            reasons = ", ".join(f"{k} {v:,}" for k, v in list(s["removed"].items())[:6])
            more = f" and {len(s['removed']) - 6} more" if len(s["removed"]) > 6 else ""
            console.print(f"  {s['name']}: {reasons}{more}", highlight=False, soft_wrap=True)
    docs = r["documents"]
    console.print(f"kept {docs['count']:,} documents ({_mb(docs['bytes'])} MB) in {docs['folder']}",
                  highlight=False)
    if "dedup" in r:
        d = r["dedup"]
        sizes = ", ".join(f"{size}x{count:,}" for size, count in d["cluster_sizes"].items()) or "none"
        console.print(f"dedup: {d['duplicate_clusters']:,} clusters (size x count: {sizes}), removed "
                      f"{d['exact_removed']:,} exact + {d['near_removed']:,} near duplicates of "
                      f"{d['documents']:,}; {d['candidate_pairs']:,} LSH candidate pairs", highlight=False,
                      soft_wrap=True)
    if "shards" in r:
        t, sh = r["tokenizer"], r["shards"]
        how = f"trained on {t['documents']:,} documents" if t["trained"] else "given"
        console.print(f"tokenizer: {t['path']} ({t['vocab_size']:,} tokens, {how})", highlight=False)
        split = ", ".join(f"{name} {sh[name]['documents']:,} docs / {sh[name]['tokens']:,} tokens"
                          for name in ("train", "valid"))
        console.print(f"shards: {sh['folder']}: {split} ({sh['dtype']}, EOS {sh['eos_id']} appended)",
                      highlight=False)
    speed = "; ".join(f"{stage} {t['seconds']:.1f} s{_speed(t)}" for stage, t in r["throughput"].items())
    console.print(f"throughput: {speed}; wall {r['wall_seconds']:.1f} s"
                  + (" (resumed)" if r["resumed"] else ""), highlight=False, soft_wrap=True)
    console.print(f"report: {r['output']}/report.json; removed documents: {r['output']}/rejects/",
                  highlight=False)


@command(
    "preprocess", order=20, arguments=_preprocess_arguments,
    summary=(
        "clean, filter, deduplicate and tokenize documents into training shards, as one YAML pipeline "
        "says"
    ),
    example="dsv3 preprocess --config configs/data/demo.yaml --workers 2 --set dedup.minhash.threshold=0.7",
)
def run_preprocess(args: argparse.Namespace) -> int:
    from dsv3.data.pipeline import run_pipeline
    from dsv3.data.pipeline_config import load_pipeline_config

    positive("--workers", args.workers)
    cfg = load_pipeline_config(args.config, args.set, args.input, args.output, args.workers)
    columns = (TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[docs]:>10,} docs"), TimeElapsedColumn())
    with Progress(*columns, console=err_console) as progress:
        tasks: dict[str, int] = {}

        def on_progress(stage: str, done: int, total: int, docs: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total, docs=0)
            progress.update(tasks[stage], completed=done, total=total, docs=docs)

        report = run_pipeline(cfg, on_progress)
    _print_preprocess_report(report)
    return 0


# --- tokenizer -------------------------------------------------------------------------------


def _tokenizer_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="<action>", required=True)
    train = sub.add_parser("train", help="train a byte-level BPE on the text of jsonl/parquet documents",
                           formatter_class=Formatter)
    train.add_argument("--input", nargs="+", required=True, metavar="PATH",
                       help=".jsonl, .jsonl.gz, .jsonl.zst or .parquet files, or folders of them")
    train.add_argument("--vocab-size", type=int, required=True, help="tokens, special tokens included")
    train.add_argument("--output", required=True, metavar="DIR", help="gets tokenizer.json and its configs")
    train.add_argument("--text-field", default="text", help="the field (column) holding the text")
    train.add_argument("--limit", type=int, metavar="N", help="train on the first N documents only")


@command(
    "tokenizer", order=30, arguments=_tokenizer_arguments,
    summary="train a byte-level BPE tokenizer (DeepSeek-V3 special tokens) that transformers loads",
    example="dsv3 tokenizer train --input out/clean --vocab-size 32000 --output out/tokenizer",
)
def run_tokenizer(args: argparse.Namespace) -> int:
    from dsv3.data.tokenizer import load_tokenizer, special_token_ids, train_tokenizer_from_files

    positive("--limit", args.limit)
    with progress_bar("reading documents") as progress:
        task = progress.add_task("read", total=args.limit)
        path, used, skipped, examples = train_tokenizer_from_files(
            args.input, args.vocab_size, args.output, args.text_field, args.limit,
            on_document=lambda: progress.advance(task),
        )
    tokenizer = load_tokenizer(path)
    bos, eos, pad = special_token_ids(tokenizer)
    console.print(f"wrote [bold]{path}[/bold]: {tokenizer.get_vocab_size():,} tokens from {used:,} documents "
                  f"(bos={bos}, eos={eos}, pad={pad})", highlight=False)
    if skipped:
        console.print(f"[yellow]skipped {skipped:,} unreadable records[/yellow], e.g.:", highlight=False)
        for record in examples[:5]:
            console.print(f"  {record}", highlight=False, soft_wrap=True)
    return 0

