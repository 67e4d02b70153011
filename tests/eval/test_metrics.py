"""Metric definitions against direct computations."""

from __future__ import annotations

import itertools
import math
import statistics

import pytest

from dsv3.eval.metrics import choice_predictions, mean_stderr, pass_at_k


@pytest.mark.parametrize("n, c", [(1, 0), (1, 1), (5, 2), (10, 3), (10, 10), (20, 0)])
def test_pass_at_k_is_the_chance_that_some_of_k_draws_pass(n, c):
    for k in range(1, n + 1):
        draws = list(itertools.combinations(range(n), k))  # sample i passes when i < c
        expected = sum(any(i < c for i in d) for d in draws) / len(draws)
        assert pass_at_k(n, c, k) == pytest.approx(expected)
        assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))
    with pytest.raises(ValueError):
        pass_at_k(n, c, n + 1)


def test_acc_norm_divides_by_the_answer_length():
    # log-likelihoods of a short and a long answer: the long one loses on the sum, wins per character
    pred, pred_norm = choice_predictions([-4.0, -6.0], [" no", " a much longer answer"])
    assert (pred, pred_norm) == (0, 1)
    assert choice_predictions([-1.0, -1.0], [" A", " B"]) == (0, 0)  # ties go to the first


def test_mean_and_standard_error():
    values = [1.0, 0.0, 1.0, 1.0]
    mean, stderr = mean_stderr(values)
    assert mean == 0.75 and stderr == pytest.approx(statistics.stdev(values) / 2)
    assert math.isnan(mean_stderr([1.0])[1])
