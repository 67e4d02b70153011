"""Run tasks on a model (or on given completions) and write the results.

    results = evaluate(lm, EvalConfig(tasks=["mmlu", "gsm8k"], limit=50), Path("eval_results"))

Writes, atomically, into the output directory:

    results.json             metrics (mean and stderr) per task, n, shots, seconds, the config, versions
    results.md               the same as a markdown table
    samples_<task>.jsonl     one record per item (per completion for generation tasks): the prompt,
                             log-likelihoods or completion, the prediction, and its score

`predictions` (read with `read_predictions`) replaces the model for generation tasks: the given
completions are scored, so a scorer can be checked on the datasets' own solutions
(`write_references`) or on another system's outputs.
"""

from __future__ import annotations

import datetime
import json
import logging
import random
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dsv3 import __version__
from dsv3.config import ConfigError
from dsv3.eval.data import PACKAGES, load_dataset, package_version, read_jsonl
from dsv3.eval.lm import GenerationRequest, LanguageModel
from dsv3.eval.sandbox import SandboxLimits, isolation
from dsv3.eval.scoring import Metrics, score_choices, score_code, score_math
from dsv3.eval.tasks import GenerationItem, Item, Task, get_tasks
from dsv3.io import atomic_open, write_json_atomic, write_text_atomic

__all__ = ["EvalConfig", "evaluate", "read_predictions", "write_references", "markdown_table"]

log = logging.getLogger(__name__)

ProgressFactory = Callable[[str, int], Callable[[int], None]]  # (description, total) → advance(n)
Predictions = dict[str, dict[str, list[str]]]  # task → item id → completions


class EvalConfig(BaseModel):
    """What `dsv3 eval` runs; see docs/evaluation.md."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[str]
    limit: int | None = Field(None, ge=1)  # first N items per task (per subject for MMLU)
    num_fewshot: int | None = Field(None, ge=0)  # None: each task's default
    seed: int = 1234  # few-shot draws and sampling
    samples: int = Field(1, ge=1)  # completions per generation item (pass@k needs k ≤ samples)
    temperature: float = Field(0.0, ge=0)  # for generation tasks; 0 = greedy
    top_p: float = Field(1.0, gt=0, le=1)
    pass_k: list[int] = [1]
    max_new_tokens: int | None = Field(None, ge=1)  # None: each task's default
    cache_dir: Path | None = None
    workers: int | None = Field(None, ge=1)  # programs run at once in the sandbox
    sandbox: SandboxLimits = SandboxLimits()

    @field_validator("tasks")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        return [t.name for t in get_tasks(names)]

    def shots(self, task: Task) -> int:
        shots = task.default_fewshot if self.num_fewshot is None else self.num_fewshot
        if task.max_fewshot is not None and shots > task.max_fewshot:
            raise ConfigError(
                f"{task.name}: --num-fewshot {shots}, but it has {task.max_fewshot} few-shot examples"
            )
        return shots


def _limited(task: Task, docs: list[dict], limit: int | None) -> list[dict]:
    if limit is None:
        return docs
    if not task.per_subject_limit:
        return docs[:limit]
    counts: dict[str, int] = {}
    kept = []
    for doc in docs:
        counts[doc["subject"]] = counts.get(doc["subject"], 0) + 1
        if counts[doc["subject"]] <= limit:
            kept.append(doc)
    return kept


def read_predictions(path: Path | str) -> Predictions:
    """Completions from a jsonl file of {"task", "id", "completion"} records (a sample log works)."""
    found: Predictions = {}
    for n, row in enumerate(read_jsonl(Path(path)), 1):
        try:
            task, item, completion = row["task"], str(row["id"]), row["completion"]
        except KeyError as e:
            raise ConfigError(
                f"{path}:{n}: a prediction needs task, id and completion; missing {e}"
            ) from None
        if not isinstance(completion, str):
            raise ConfigError(f"{path}:{n}: completion must be a string, got {type(completion).__name__}")
        found.setdefault(task, {}).setdefault(item, []).append(completion)
    return found


def _given(
    task: Task, items: list[Item], predictions: Predictions, source: str
) -> tuple[list, list[list[str]]]:
    if task.kind == "choice":
        raise ConfigError(
            f"{task.name} is scored by log-likelihoods: --predictions works for gsm8k, humaneval, mbpp"
        )
    given = predictions.get(task.name)
    if not given:
        raise ConfigError(f"{source}: no predictions for task {task.name}")
    known = {item.id for item in items}
    unknown = [i for i in given if i not in known]
    if unknown:
        more = f" (nor {len(unknown) - 1} other ids)" if len(unknown) > 1 else ""
        raise ConfigError(f"{source}: {task.name} has no item {unknown[0]!r}{more} in this selection")
    kept = [item for item in items if item.id in given]
    if len(kept) < len(items):
        log.warning(
            "%s: predictions for %d of %d %s items; scoring those", source, len(kept), len(items), task.name
        )
    return kept, [given[item.id] for item in kept]


def _generate(
    lm: LanguageModel,
    task: Task,
    items: list[GenerationItem],
    config: EvalConfig,
    progress: Callable[[int], None] | None,
) -> list[list[str]]:
    request = partial(
        GenerationRequest,
        max_new_tokens=config.max_new_tokens or task.max_new_tokens,
        stop=task.stop,
        temperature=config.temperature,
        top_p=config.top_p,
    )
    requests = [request(item.prompt) for item in items for _ in range(config.samples)]
    flat = lm.generate(requests, seed=config.seed, progress=progress)
    return [flat[i * config.samples : (i + 1) * config.samples] for i in range(len(items))]


def _run_task(
    task: Task,
    lm: LanguageModel | None,
    config: EvalConfig,
    predictions: Predictions | None,
    source: str,
    progress: ProgressFactory | None,
) -> tuple[Metrics, list[dict], int, int]:
    load = partial(load_dataset, cache_dir=config.cache_dir)
    shots = config.shots(task)
    docs = _limited(task, load(task.dataset, task.split), config.limit)
    items = task.build(docs, shots, random.Random(config.seed), load)

    def bar(what: str, total: int) -> Callable[[int], None] | None:
        return progress(f"{task.name}: {what}", total) if progress else None

    if predictions is not None:
        items, completions = _given(task, items, predictions, source)
    elif task.kind == "choice":
        assert lm is not None
        metrics, samples = score_choices(
            lm, task, items, bar("log-likelihoods", sum(len(i.choices) for i in items))
        )
        return metrics, samples, len(items), shots
    else:
        assert lm is not None
        completions = _generate(lm, task, items, config, bar("generating", len(items) * config.samples))
    if task.kind == "math":
        metrics, samples = score_math(task, items, completions)
    else:
        metrics, samples = score_code(
            task,
            items,
            completions,
            config.pass_k,
            config.sandbox,
            config.workers,
            bar("running tests", sum(len(c) for c in completions)),
        )
    return metrics, samples, len(items), shots


def _isolation_report() -> dict:
    isolated, reason = isolation()
    return {"isolated": isolated, "reason": reason}


def markdown_table(results: dict) -> str:
    lines = [
        f"Model: `{results['model']}`",
        "",
        "| task | metric | value | ± stderr | n | shots | seconds |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, task in results["tasks"].items():
        for metric, value in task["metrics"].items():
            stderr = task["metrics_stderr"][metric]
            lines.append(
                f"| {name} | {metric} | {value:.4f} | {stderr:.4f} | {task['n']} | "
                f"{task['num_fewshot']} | {task['seconds']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def evaluate(
    lm: LanguageModel | None,
    config: EvalConfig,
    output_dir: Path | str,
    *,
    predictions: Predictions | None = None,
    predictions_source: str = "predictions",
    progress: ProgressFactory | None = None,
) -> dict:
    """Run `config.tasks` on `lm` (or score `predictions`), write the outputs, return results.json."""
    if (lm is None) == (predictions is None):
        raise ValueError("evaluate: give a model or predictions, not both")
    if config.samples > 1 and config.temperature == 0 and lm is not None:
        raise ConfigError(
            f"--samples {config.samples} with --temperature 0 repeats one greedy completion: "
            "set a temperature (e.g. 0.8)"
        )
    output_dir = Path(output_dir)
    tasks = get_tasks(config.tasks)
    code = [t for t in tasks if t.kind == "code"]
    results = {
        "model": lm.name if lm is not None else f"predictions: {predictions_source}",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"dsv3": __version__, **{p: package_version(p) for p in PACKAGES}},
        "config": config.model_dump(mode="json"),
        "sandbox_isolation": _isolation_report() if code and config.sandbox.isolate != "off" else None,
        "tasks": {},
    }
    for task in tasks:
        start = time.perf_counter()
        metrics, samples, n, shots = _run_task(task, lm, config, predictions, predictions_source, progress)
        seconds = time.perf_counter() - start
        with atomic_open(output_dir / f"samples_{task.name}.jsonl", "w") as f:
            for sample in samples:
                f.write(json.dumps(sample, ensure_ascii=False) + "\n")
        results["tasks"][task.name] = {
            "metrics": {k: v[0] for k, v in metrics.items()},
            "metrics_stderr": {k: v[1] for k, v in metrics.items()},
            "n": n,
            "num_fewshot": shots,
            "fewshot_source": task.fewshot_source,
            "seconds": round(seconds, 2),
        }
        log.info(
            "%s: %s (%d items, %.1f s)",
            task.name,
            ", ".join(f"{k} {v[0]:.4f}" for k, v in metrics.items()),
            n,
            seconds,
        )
    write_json_atomic(output_dir / "results.json", results)
    write_text_atomic(output_dir / "results.md", markdown_table(results))
    return results


def write_references(
    tasks: list[str], path: Path | str, cache_dir: Path | None = None, limit: int | None = None
) -> int:
    """The datasets' own solutions of generation tasks as a predictions file; returns the count."""
    count = 0
    with atomic_open(path, "w") as f:
        for task in get_tasks(tasks):
            if task.reference is None:
                raise ConfigError(f"{task.name}: no reference completions (a log-likelihood task)")
            for doc in _limited(task, load_dataset(task.dataset, task.split, cache_dir), limit):
                f.write(
                    json.dumps({"task": task.name, "id": doc["id"], "completion": task.reference(doc)}) + "\n"
                )
                count += 1
    return count
