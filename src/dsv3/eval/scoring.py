"""Scorers: a task's items plus the model's log-likelihoods or completions → metrics and per-item samples.

Each returns (metrics, samples): metrics maps a name to (mean, stderr); samples are the per-item
records written to the sample log (a generation task's records carry `task`, `id` and
`completion`, so a sample log can be scored again with `dsv3 eval --predictions`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from dsv3.eval.lm import LanguageModel, LoglikelihoodRequest
from dsv3.eval.metrics import choice_predictions, mean_stderr, pass_at_k
from dsv3.eval.sandbox import SandboxLimits, run_programs
from dsv3.eval.tasks import ChoiceItem, GenerationItem, Task

__all__ = ["Metrics", "score_choices", "score_math", "score_code"]

Metrics = dict[str, tuple[float, float]]
Progress = Callable[[int], None] | None


def score_choices(
    lm: LanguageModel, task: Task, items: Sequence[ChoiceItem], progress: Progress = None
) -> tuple[Metrics, list[dict]]:
    requests = [LoglikelihoodRequest(item.context, choice) for item in items for choice in item.choices]
    results = iter(lm.loglikelihood(requests, progress))
    samples = []
    for item in items:
        logprobs = [next(results).logprob for _ in item.choices]
        pred, pred_norm = choice_predictions(logprobs, item.choices)
        samples.append(
            {
                "task": task.name,
                "id": item.id,
                "gold": item.gold,
                "pred": pred,
                "pred_norm": pred_norm,
                "acc": float(pred == item.gold),
                "acc_norm": float(pred_norm == item.gold),
                "logprobs": logprobs,
                "choices": list(item.choices),
                "context": item.context,
            }
        )
    metrics = {name: mean_stderr([s[name] for s in samples]) for name in ("acc", "acc_norm")}
    return metrics, samples


def score_math(
    task: Task, items: Sequence[GenerationItem], completions: Sequence[Sequence[str]]
) -> tuple[Metrics, list[dict]]:
    """`completions[i]`: the completions of item i (one, or several when sampling: averaged)."""
    assert task.check is not None
    samples, per_item = [], {"exact_match": [], "exact_match_flex": []}
    for item, outs in zip(items, completions, strict=True):
        checks = [task.check(item.doc, out) for out in outs]
        for name, values in per_item.items():
            values.append(sum(c[name] for c in checks) / len(checks))
        for j, (out, check) in enumerate(zip(outs, checks, strict=True)):
            samples.append(
                {
                    "task": task.name,
                    "id": item.id,
                    "sample": j,
                    "completion": out,
                    **check,
                    "prompt": item.prompt,
                }
            )
    return {name: mean_stderr(values) for name, values in per_item.items()}, samples


def score_code(
    task: Task,
    items: Sequence[GenerationItem],
    completions: Sequence[Sequence[str]],
    ks: Sequence[int] = (1,),
    limits: SandboxLimits | None = None,
    workers: int | None = None,
    progress: Progress = None,
) -> tuple[Metrics, list[dict]]:
    """Run every completion's program in the sandbox; pass@k for each k ≤ completions per item."""
    assert task.program is not None
    programs = [
        task.program(item.doc, out) for item, outs in zip(items, completions, strict=True) for out in outs
    ]
    results = iter(run_programs(programs, limits, workers, progress))
    samples, passed = [], []
    for item, outs in zip(items, completions, strict=True):
        runs = [next(results) for _ in outs]
        passed.append(sum(r.passed for r in runs))
        for j, (out, run) in enumerate(zip(outs, runs, strict=True)):
            samples.append(
                {
                    "task": task.name,
                    "id": item.id,
                    "sample": j,
                    "completion": out,
                    "passed": run.passed,
                    "result": run.summary(),
                    "seconds": round(run.seconds, 3),
                    "isolated": run.isolated,
                    "prompt": item.prompt,
                }
            )
    n = min((len(outs) for outs in completions), default=0)
    metrics = {
        f"pass@{k}": mean_stderr(
            [pass_at_k(len(outs), c, k) for outs, c in zip(completions, passed, strict=True)]
        )
        for k in ks
        if k <= n
    }
    return metrics, samples
