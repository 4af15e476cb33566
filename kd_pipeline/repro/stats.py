"""Paired comparisons over seeds and the pre-registered verdict (``design.pass_rule_text``).

Each seed gives one paired difference d_s = treatment_s - control_s (same world, same teacher, same starting
checkpoint). Reported: mean, its standard error sd(d)/sqrt(n), the one-sided paired t-test p (H1: mean > 0, df n - 1,
scipy's t distribution), the two-sided p, and as a distribution-free check the exact one-sided sign-flip
permutation p (all 2^n sign patterns; its smallest possible value with 5 seeds is 1/32 = 0.031).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

from kd_pipeline.repro.design import ALPHA, COMPARISONS, PRIMARY_METRIC


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


def comparisons(values: Mapping[str, Sequence[float]]) -> dict[str, dict]:
    """{comparison: paired_test} for every comparison of design.COMPARISONS whose two arms have values
    (``values``: arm -> one value per seed, seeds in the same order for every arm)."""
    return {name: paired_test(values[treatment], values[control])
            for name, (treatment, control) in COMPARISONS.items() if treatment in values and control in values}


def significant(test: dict, alpha: float = ALPHA) -> bool:
    return test.get("p_one_sided") is not None and test["mean"] > 0 and test["p_one_sided"] < alpha


def condition_verdict(primary: Mapping[str, dict], kl: Mapping[str, dict]) -> dict:
    """The pass rule for one condition from its comparisons on the primary metric and on KL(p_T||p_S)."""
    sensitive = ("P-A" in primary and significant(primary["P-A"]) and "N-A" in primary
                 and primary["N-A"].get("p_two_sided") is not None and primary["N-A"]["p_two_sided"] >= ALPHA)
    kl_lower = "D-C" in kl and kl["D-C"]["mean"] < 0
    distils = "D-C" in primary and significant(primary["D-C"]) and kl_lower
    stage2 = "E-F" in primary and significant(primary["E-F"])
    return {"harness_sensitive": sensitive, "d_minus_c_significant": "D-C" in primary and significant(primary["D-C"]),
            "kl_d_below_c": kl_lower, "distillation_works": sensitive and distils,
            "e_minus_f_significant": stage2, "primary_metric": PRIMARY_METRIC}


def overall_verdict(by_condition: Mapping[str, dict]) -> dict:
    holds_in = [name for name, verdict in by_condition.items() if verdict["distillation_works"]]
    return {"rule_holds": bool(holds_in), "holds_in": holds_in,
            "harness_sensitive_in": [name for name, verdict in by_condition.items() if verdict["harness_sensitive"]]}
