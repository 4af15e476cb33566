"""The experiment's statistics and report against independent computations (scipy's paired t-test, a brute-force
sign-flip enumeration), and the pre-registered verdict on constructed results."""

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


def _per_seed(effect: dict[str, float], seeds: int = 5, kl_effect: float = -0.05) -> dict:
    """Constructed results: arm value = base + seed noise + effect; KL of D lower by kl_effect."""
    rng = np.random.default_rng(0)
    per_seed = {}
    for seed in range(seeds):
        base = 0.5 + 0.05 * rng.standard_normal()
        arms = {}
        for arm in (*design.ARMS, "teacher"):
            value = base + effect.get(arm, 0.0) + 0.002 * rng.standard_normal()
            kl = 1.0 + (kl_effect if arm == "D" else 0.0) + 0.001 * rng.standard_normal()
            arms[arm] = {metric: {"value": value, "se": 0.01} for metric in ("scene_fc", "vqa_fc", "caption_rougeL")}
            arms[arm]["kl_scene"] = {"value": kl, "se": 0.01}
        arms["image_free"] = {metric: {"value": 0.1, "se": 0.01} for metric in ("scene_fc", "vqa_fc", "caption_rougeL")}
        per_seed[str(seed)] = {"paper": arms}
    return per_seed


def test_verdict_holds_only_with_a_sensitive_harness_and_a_significant_d_minus_c():
    works = report.summarise(_per_seed({"P": 0.05, "D": 0.03, "teacher": 0.3}), ["paper"])
    verdict = works["conditions"]["paper"]["verdict"]
    assert verdict["harness_sensitive"] and verdict["distillation_works"] and works["verdict"]["rule_holds"]
    assert works["conditions"]["paper"]["world_checks"]["scene_fc"]["gap_at_least_15_points"]

    no_effect = report.summarise(_per_seed({"P": 0.05, "teacher": 0.3}), ["paper"])
    assert not no_effect["verdict"]["rule_holds"]
    assert no_effect["conditions"]["paper"]["verdict"]["harness_sensitive"]

    insensitive = report.summarise(_per_seed({"D": 0.03}), ["paper"])  # P does not win: nothing counts
    assert not insensitive["conditions"]["paper"]["verdict"]["harness_sensitive"]
    assert not insensitive["verdict"]["rule_holds"]

    kl_higher = report.summarise(_per_seed({"P": 0.05, "D": 0.03}, kl_effect=+0.05), ["paper"])
    assert not kl_higher["verdict"]["rule_holds"]


def test_markdown_states_the_verdict_and_the_plot_is_written(tmp_path):
    summary = report.summarise(_per_seed({"P": 0.05, "teacher": 0.3}), ["paper"])
    text = report.markdown(summary)
    assert "does NOT hold" in text and "| D-C |" in text and "± " in text
    assert summary["verdict"]["final"] and "Interim" not in text

    interim = report.summarise(_per_seed({"P": 0.05, "D": 0.03, "teacher": 0.3}, seeds=3), ["paper"])
    assert interim["verdict"]["rule_holds"] and not interim["verdict"]["final"]
    assert "Interim: 3 of the 5 pre-registered seeds" in report.markdown(interim)
    report.plot(summary, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report.write_results(tmp_path / "r.json", {"summary": summary})
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["seeds"] == ["0", "1", "2", "3", "4"]


def test_extract_reads_values_and_standard_errors():
    evaluation = {"aid": {"fc": {"oa": 0.4, "oa_se": 0.02}, "greedy": {"oa": 0.3, "oa_se": 0.02}},
                  "agreement": {"aid": {"all": {"kl": 0.7, "kl_se": 0.05}, "decision": {"top1": 0.8, "top1_se": 0.01}}}}
    values = report.extract(evaluation)
    assert values["scene_fc"] == {"value": 0.4, "se": 0.02}
    assert values["kl_scene"] == {"value": 0.7, "se": 0.05}
    assert "vqa_fc" not in values
