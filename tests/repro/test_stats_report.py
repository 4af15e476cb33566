"""The experiment's statistics and report against independent computations (scipy's paired t-test, a brute-force
sign-flip enumeration, statsmodels-free Holm by its definition, Fieller's set found by scanning r), and the
pre-registered verdict of design 2 on constructed results."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from scipy import stats as scipy_stats

from kd_pipeline.repro import design, report, stats


def test_paired_test_matches_scipy_ttest_rel():
    treatment, control = [0.61, 0.55, 0.70, 0.58, 0.66], [0.52, 0.57, 0.61, 0.50, 0.60]
    result = stats.paired_test(treatment, control)
    reference = scipy_stats.ttest_rel(treatment, control, alternative="greater")
    assert result["p_one_sided"] == pytest.approx(reference.pvalue)
    assert result["p_two_sided"] == pytest.approx(scipy_stats.ttest_rel(treatment, control).pvalue)
    differences = np.subtract(treatment, control)
    assert result["mean"] == pytest.approx(differences.mean())
    assert result["se"] == pytest.approx(differences.std(ddof=1) / np.sqrt(5))


def test_sign_flip_p_by_enumeration():
    differences = [0.03, -0.01, 0.05, 0.02, 0.04]
    observed = np.mean(differences)
    means = [np.mean(np.multiply(signs, differences)) for signs in itertools.product([1, -1], repeat=5)]
    assert stats.sign_flip_p(differences) == pytest.approx(np.mean(np.array(means) >= observed - 1e-12))
    assert stats.sign_flip_p([1.0] * 5) == pytest.approx(1 / 32)


def test_too_few_pairs_give_no_p_value_and_mismatched_lengths_are_refused():
    assert stats.paired_test([0.5], [0.4])["p_one_sided"] is None
    with pytest.raises(ValueError, match="pairs"):
        stats.paired_test([0.5, 0.6], [0.4])


def test_holm_by_its_definition():
    """Holm: the k-th smallest p times (m - k + 1), running maximum, capped at 1; a missing p is not a test."""
    assert stats.holm({"a": 0.01, "b": 0.04}) == pytest.approx({"a": 0.02, "b": 0.04})
    assert stats.holm({"a": 0.03, "b": 0.02}) == pytest.approx({"a": 0.04, "b": 0.04})  # running max
    assert stats.holm({"a": 0.7, "b": 0.6}) == pytest.approx({"a": 1.0, "b": 1.0})
    assert stats.holm({"a": 0.03, "b": None}) == {"a": pytest.approx(0.03), "b": None}


def test_fieller_interval_is_the_set_of_ratios_a_t_test_does_not_reject():
    """Fieller's set = {r: |mean(x - r y)| / se(x - r y) <= t}; scanning r gives its ends independently."""
    numerator = [0.020, 0.035, 0.010, 0.028, 0.022]
    denominator = [0.040, 0.052, 0.031, 0.047, 0.038]
    result = stats.fieller_ratio(numerator, denominator)
    t = scipy_stats.t.ppf(0.975, 4)
    grid = np.linspace(-2, 3, 500_001)
    x, y = np.array(numerator), np.array(denominator)
    combos = x[None] - grid[:, None] * y[None]  # (R, n)
    accepted = grid[np.abs(combos.mean(1)) <= t * combos.std(1, ddof=1) / np.sqrt(5)]
    assert result["bounded"] and result["ratio"] == pytest.approx(x.mean() / y.mean())
    assert result["low"] == pytest.approx(accepted.min(), abs=2e-5)
    assert result["high"] == pytest.approx(accepted.max(), abs=2e-5)
    unresolved = stats.fieller_ratio(numerator, [0.01, -0.02, 0.015, -0.01, 0.02])  # Pc-C indistinguishable from 0
    assert not unresolved["bounded"] and unresolved["low"] is None


def _per_seed(effect: dict[str, float], condition: str = "unlabelled", seeds: int = 5,
              kl_effect: dict[str, float] | None = None) -> dict:
    """Constructed results: arm value = base + seed noise + effect; KL of each arm = 1 + kl_effect."""
    kl_effect = {"D": -0.05, "E": -0.05} if kl_effect is None else kl_effect
    rng = np.random.default_rng(0)
    per_seed = {}
    for seed in design.DEFAULT_SEEDS[:seeds]:
        base = 0.5 + 0.05 * rng.standard_normal()
        arms = {}
        for arm in (*design.condition_arms(condition), "teacher"):
            value = base + effect.get(arm, 0.0) + 0.002 * rng.standard_normal()
            arms[arm] = {metric: {"value": value, "se": 0.01} for metric in ("scene_fc", "vqa_fc", "caption_rougeL")}
            arms[arm]["kl_scene"] = {"value": 1.0 + kl_effect.get(arm, 0.0) + 0.001 * rng.standard_normal(),
                                     "se": 0.01}
        arms["image_free"] = {metric: {"value": 0.1, "se": 0.01} for metric in ("scene_fc", "vqa_fc", "caption_rougeL")}
        per_seed[str(seed)] = {condition: arms}
    return per_seed


def test_verdict_needs_a_sensitive_condition_and_a_holm_significant_difference_with_lower_kl():
    works = report.summarise(_per_seed({"Pc": 0.05, "E": 0.03, "teacher": 0.3}), ["unlabelled"])
    verdict = works["conditions"]["unlabelled"]["verdict"]
    assert verdict["harness_sensitive"] and verdict["distillation_works"] and verdict["works_by"] == ["E-F"]
    assert works["verdict"]["rule_holds"] and works["verdict"]["holds_in"] == ["unlabelled"]
    assert verdict["tests"]["E-F"]["p_holm"] == pytest.approx(
        min(1.0, 2 * works["conditions"]["unlabelled"]["comparisons"]["scene_fc"]["E-F"]["p_one_sided"]))
    assert works["conditions"]["unlabelled"]["world_checks"]["scene_fc"]["gap_at_least_15_points"]

    insensitive = report.summarise(_per_seed({"E": 0.03}), ["unlabelled"])  # Pc does not beat C: nothing counts
    assert not insensitive["conditions"]["unlabelled"]["verdict"]["harness_sensitive"]
    assert not insensitive["verdict"]["rule_holds"]

    kl_higher = report.summarise(_per_seed({"Pc": 0.05, "E": 0.03}, kl_effect={"E": 0.05}), ["unlabelled"])
    assert not kl_higher["verdict"]["rule_holds"]  # more accurate but further from the teacher: not distillation

    by_d = report.summarise(_per_seed({"Pc": 0.05, "D": 0.03}), ["unlabelled"])  # stage 1 wins, stage 2 does not
    assert by_d["conditions"]["unlabelled"]["verdict"]["works_by"] == ["D-C"]
    assert not by_d["conditions"]["unlabelled"]["verdict"]["tests"]["E-F"]["significant"]


def test_recovered_share_is_reported_in_unlabelled_only():
    summary = report.summarise(_per_seed({"Pc": 0.06, "E": 0.03, "teacher": 0.3}), ["unlabelled"])
    share = summary["conditions"]["unlabelled"]["recovered_share"]
    assert share["ratio"] == pytest.approx(0.5, abs=0.05) and share["bounded"] and share["low"] < 0.5 < share["high"]
    paper = report.summarise(_per_seed({"Pc": 0.06, "E": 0.03}, condition="paper"), ["paper"])
    assert "recovered_share" not in paper["conditions"]["paper"]
    assert set(paper["conditions"]["paper"]["comparisons"]["scene_fc"]) == {"D-C", "E-F", "E-D", "Pc-C", "N-A",
                                                                            "D_al-D", "E0-E"}


def test_markdown_states_the_verdict_and_the_plot_is_written(tmp_path):
    summary = report.summarise(_per_seed({"Pc": 0.05, "teacher": 0.3}), ["unlabelled"])
    text = report.markdown(summary)
    assert "does NOT hold" in text and "| E-G |" in text and "| E-E_ss |" in text and "± " in text
    assert "Recovered share" in text and "Holm p" in text
    assert summary["verdict"]["final"] and "Interim" not in text

    interim = report.summarise(_per_seed({"Pc": 0.05, "E": 0.03, "teacher": 0.3}, seeds=3), ["unlabelled"])
    assert interim["verdict"]["rule_holds"] and not interim["verdict"]["final"]
    assert "Interim: 3 of the 5 pre-registered seeds" in report.markdown(interim)
    other_seed = report.summarise({"0": _per_seed({"Pc": 0.05}, seeds=1)[str(design.DEFAULT_SEEDS[0])]},
                                  ["unlabelled"])  # the demo's seed 0: not the experiment
    assert not other_seed["verdict"]["final"]
    assert "Not the experiment: seed(s) 0 are not among its pre-registered seeds 5, 6, 7, 8, 9" in \
        report.markdown(other_seed) and "Interim" not in report.markdown(other_seed)
    five_others = report.summarise({str(int(seed) + 10): results for seed, results in _per_seed({"Pc": 0.05}).items()},
                                   ["unlabelled"])  # as many seeds as registered, but not the registered ones
    assert not five_others["verdict"]["final"] and "Not the experiment" in report.markdown(five_others)
    report.plot(summary, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report.write_results(tmp_path / "r.json", {"summary": summary})
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["summary"]["seeds"] == [str(seed) for seed in design.DEFAULT_SEEDS]


def test_one_seed_shows_the_difference_with_the_arms_combined_standard_errors():
    summary = report.summarise(_per_seed({"Pc": 0.05}, seeds=1), ["unlabelled"])
    line = next(line for line in report.markdown(summary).splitlines() if line.startswith("| Pc-C |"))
    assert line.split("|")[2].strip().endswith(f"± {100 * np.sqrt(2) * 0.01:.1f} (p=–)")


def test_extract_reads_values_and_standard_errors():
    evaluation = {"aid": {"fc": {"oa": 0.4, "oa_se": 0.02}},
                  "agreement": {"aid": {"all": {"kl": 0.7, "kl_se": 0.05}, "decision": {"top1": 0.8, "top1_se": 0.01}}}}
    values = report.extract(evaluation)
    assert values["scene_fc"] == {"value": 0.4, "se": 0.02}
    assert values["kl_scene"] == {"value": 0.7, "se": 0.05}
    assert "vqa_fc" not in values and "scene_greedy" not in values
