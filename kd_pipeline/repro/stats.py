"""Paired comparisons over seeds, Holm's correction, the recovered share, and the pre-registered verdict.

Each seed gives one paired difference d_s = treatment_s - control_s (same world, same teacher, same starting
checkpoint). Reported: mean, its standard error sd(d)/sqrt(n), the one-sided paired t-test p (H1: mean > 0, df n - 1,
scipy's t distribution), the two-sided p, and as a distribution-free check the exact one-sided sign-flip
permutation p (all 2^n sign patterns; its smallest possible value with 5 seeds is 1/32 = 0.031).

Holm's step-down correction (Holm 1979) over the two distillation tests of ``design.DISTILLATION``: with m tests
sorted by p, the k-th smallest is adjusted to max over j <= k of min(1, (m - j + 1) p_(j)).

The recovered share (E-F)/(Pc-C) is a ratio of two paired means over the same seeds; its interval is Fieller's
(1954), which accounts for the noise of the denominator and the covariance of the two: the set of r with
(a - r b)^2 <= t^2 (v_aa - 2 r v_ab + r^2 v_bb), a and b the mean differences, v their (co)variances of the mean,
t the two-sided 95 % quantile with n - 1 degrees of freedom. When the denominator is not itself distinguishable
from 0 (b^2 < t^2 v_bb) the set is not a bounded interval and is reported as unbounded.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

from kd_pipeline.repro import design
from kd_pipeline.repro.design import ALPHA


def paired_test(treatment: Sequence[float], control: Sequence[float]) -> dict:
    """Statistics of the paired differences; p-values are None with fewer than 2 pairs (or no spread)."""
    if len(treatment) != len(control):
        raise ValueError(f"{len(treatment)} treatment values but {len(control)} control values: pairs needed")
    differences = [t - c for t, c in zip(treatment, control)]
    count = len(differences)
    result = {"n": count, "differences": differences, "mean": sum(differences) / count if count else float("nan"),
              "se": None, "t": None, "p_one_sided": None, "p_two_sided": None, "p_sign_flip": None}
    if count < 2:
        return result
    mean = result["mean"]
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (count - 1))
    result["se"] = sd / math.sqrt(count)
    result["p_sign_flip"] = sign_flip_p(differences)
    if sd == 0:
        return result
    from scipy.stats import t as student_t

    result["t"] = mean / result["se"]
    result["p_one_sided"] = float(student_t.sf(result["t"], count - 1))
    result["p_two_sided"] = float(2 * student_t.sf(abs(result["t"]), count - 1))
    return result


def sign_flip_p(differences: Sequence[float]) -> float:
    """Exact one-sided permutation p: the share of the 2^n sign patterns whose mean is >= the observed mean."""
    observed = sum(differences)
    patterns = list(itertools.product((1, -1), repeat=len(differences)))
    at_least = sum(sum(sign * d for sign, d in zip(signs, differences)) >= observed - 1e-12 for signs in patterns)
    return at_least / len(patterns)


def comparisons(values: Mapping[str, Sequence[float]],
                pairs: Mapping[str, tuple[str, str]] = design.COMPARISONS) -> dict[str, dict]:
    """{comparison: paired_test} for every comparison of ``pairs`` whose two arms have values (``values``: arm ->
    one value per seed, seeds in the same order for every arm)."""
    return {name: paired_test(values[treatment], values[control])
            for name, (treatment, control) in pairs.items() if treatment in values and control in values}


def holm(p_values: Mapping[str, float | None]) -> dict[str, float | None]:
    """Holm-adjusted p-values (a missing p stays None and does not count among the m tests)."""
    known = sorted((p, name) for name, p in p_values.items() if p is not None)
    adjusted: dict[str, float | None] = {name: None for name in p_values}
    running = 0.0
    for rank, (p, name) in enumerate(known):
        running = max(running, min(1.0, (len(known) - rank) * p))
        adjusted[name] = running
    return adjusted


def fieller_ratio(numerator: Sequence[float], denominator: Sequence[float], level: float = 0.95) -> dict:
    """mean(numerator) / mean(denominator) over paired seeds with Fieller's interval (module doc)."""
    count = len(numerator)
    a, b = sum(numerator) / count, sum(denominator) / count
    result = {"ratio": a / b if b else None, "low": None, "high": None, "bounded": False, "level": level, "n": count}
    if count < 2:
        return result
    from scipy.stats import t as student_t

    t = float(student_t.ppf(0.5 + level / 2, count - 1))
    v_aa = sum((x - a) ** 2 for x in numerator) / (count - 1) / count
    v_bb = sum((y - b) ** 2 for y in denominator) / (count - 1) / count
    v_ab = sum((x - a) * (y - b) for x, y in zip(numerator, denominator)) / (count - 1) / count
    # (b^2 - t^2 v_bb) r^2 - 2 (a b - t^2 v_ab) r + (a^2 - t^2 v_aa) <= 0
    quadratic, linear, constant = b * b - t * t * v_bb, a * b - t * t * v_ab, a * a - t * t * v_aa
    discriminant = linear * linear - quadratic * constant
    if quadratic > 0 and discriminant >= 0:
        root = math.sqrt(discriminant)
        result.update(low=(linear - root) / quadratic, high=(linear + root) / quadratic, bounded=True)
    return result


def significant(test: Mapping | None, p_key: str = "p_one_sided", alpha: float = ALPHA) -> bool:
    return bool(test) and test.get(p_key) is not None and test["mean"] > 0 and test[p_key] < alpha


def condition_verdict(primary: Mapping[str, dict], kl: Mapping[str, dict]) -> dict:
    """The pass rule for one condition from its comparisons on the primary metric and on KL(p_T||p_S)."""
    negative = primary.get(design.NEGATIVE, {})
    sensitive = significant(primary.get(design.SENSITIVITY)) and negative.get("p_two_sided") is not None \
        and negative["p_two_sided"] >= ALPHA
    adjusted = holm({name: primary[name]["p_one_sided"] if name in primary else None for name in design.DISTILLATION})
    tests = {}
    for name in design.DISTILLATION:
        test = primary.get(name)
        kl_lower = name in kl and kl[name]["mean"] < 0  # the arm's KL(p_T||p_S) below its control's
        tests[name] = {"mean": test["mean"] if test else None, "p_one_sided": test["p_one_sided"] if test else None,
                       "p_holm": adjusted[name], "kl_below_control": kl_lower,
                       "significant": bool(test) and test["mean"] > 0 and adjusted[name] is not None
                       and adjusted[name] < ALPHA}
        tests[name]["works"] = tests[name]["significant"] and kl_lower
    works = sensitive and any(test["works"] for test in tests.values())
    return {"harness_sensitive": sensitive, "tests": tests, "distillation_works": works,
            "works_by": [name for name, test in tests.items() if sensitive and test["works"]],
            "primary_metric": design.PRIMARY_METRIC}


def overall_verdict(by_condition: Mapping[str, dict]) -> dict:
    holds_in = [name for name, verdict in by_condition.items() if verdict["distillation_works"]]
    return {"rule_holds": bool(holds_in), "holds_in": holds_in,
            "harness_sensitive_in": [name for name, verdict in by_condition.items() if verdict["harness_sensitive"]]}
