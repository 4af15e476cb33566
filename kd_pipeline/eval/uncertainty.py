"""Standard errors for the evaluation metrics: every number in a table carries one.

- A proportion p over n independent questions: the binomial SE sqrt(p (1 - p) / n).
- A mean of per-question scores (ROUGE, IoU, METEOR segments): the sample standard deviation / sqrt(n).
- An unweighted mean of K group metrics (AA over classes, mOA over question types): sqrt(sum SE_k^2) / K, the
  groups being disjoint sets of questions.
- A ratio of sums over questions (per-token means where each question has several tokens): the delta-method SE
  with the question as the unit, so tokens of one answer are not treated as independent.

Written here rather than taken from scipy/statsmodels: four one-line formulas do not justify a dependency.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def binomial_se(proportion: float, count: int) -> float:
    return math.sqrt(max(proportion * (1.0 - proportion), 0.0) / count) if count else float("nan")


def mean_se(values: Sequence[float]) -> float:
    """SE of the mean of ``values`` (sample standard deviation with n - 1, over sqrt(n)); nan for n < 2."""
    count = len(values)
    if count < 2:
        return float("nan")
    mean = sum(values) / count
    variance = sum((value - mean) ** 2 for value in values) / (count - 1)
    return math.sqrt(variance / count)


def mean_of_groups_se(group_ses: Sequence[float]) -> float:
    """SE of the unweighted mean of independent group metrics with standard errors ``group_ses``."""
    return math.sqrt(sum(se * se for se in group_ses)) / len(group_ses) if group_ses else float("nan")


def ratio_se(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """Delta-method SE of sum(numerators) / sum(denominators) with one (numerator, denominator) pair per unit."""
    count = len(numerators)
    total = sum(denominators)
    if count < 2 or total <= 0:
        return float("nan")
    ratio = sum(numerators) / total
    residual = sum((numerator - ratio * denominator) ** 2 for numerator, denominator in zip(numerators, denominators))
    return math.sqrt(residual * count / (count - 1)) / total
