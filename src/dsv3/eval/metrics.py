"""Metric definitions: multiple-choice accuracy, pass@k, and means with their standard errors.

acc        the choice with the highest log-likelihood log p(choice | context) is the gold one
acc_norm   the same with each log-likelihood divided by the choice's length in characters
           (lm-evaluation-harness's acc_norm; it removes the bias towards short answers)
pass@k     the probability that at least one of k completions drawn from n passes, estimated
           without bias from c passing ones as 1 - C(n-c, k) / C(n, k) (Chen et al. 2021)
stderr     of a mean over items: the sample standard deviation / sqrt(n)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["choice_predictions", "pass_at_k", "mean_stderr"]


def choice_predictions(logprobs: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """(argmax of log-likelihoods, argmax of log-likelihoods per character); ties go to the first."""
    lengths = [max(1, len(c.removeprefix(" "))) for c in choices]
    pred = max(range(len(logprobs)), key=lambda i: logprobs[i])
    pred_norm = max(range(len(logprobs)), key=lambda i: logprobs[i] / lengths[i])
    return pred, pred_norm


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed (requires k ≤ n)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k: need 0 ≤ c ≤ n and 1 ≤ k ≤ n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # 1 - C(n-c, k)/C(n, k) as a product, stable for large n
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)
