"""Standard errors against independent computations (statistics module, brute-force resampling identities)."""

import math
import statistics

import numpy as np
import pytest

from kd_pipeline.eval.scene import score_scene
from kd_pipeline.eval.uncertainty import binomial_se, mean_of_groups_se, mean_se, ratio_se
from kd_pipeline.eval.vqa import score_vqa


def test_mean_se_matches_the_statistics_module():
    values = [0.2, 0.9, 0.4, 0.4, 1.0, 0.0]
    assert mean_se(values) == pytest.approx(statistics.stdev(values) / math.sqrt(len(values)))
    assert math.isnan(mean_se([0.3]))


def test_binomial_se_is_the_se_of_a_mean_of_zeros_and_ones_with_population_variance():
    outcomes = [1] * 7 + [0] * 13
    assert binomial_se(7 / 20, 20) == pytest.approx(statistics.pstdev(outcomes) / math.sqrt(20))


def test_ratio_se_reduces_to_mean_se_with_one_token_per_unit_and_follows_the_delta_method():
    values = [0.3, 1.2, 0.7, 0.1, 0.9]
    assert ratio_se(values, [1.0] * 5) == pytest.approx(mean_se(values))
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 6, 400).astype(float)
    sums = counts * 0.5 + rng.normal(0, 1, 400)
    # the delta method agrees with the spread of the ratio over many resampled data sets (bootstrap)
    boot = []
    for _ in range(2000):
        index = rng.integers(0, 400, 400)
        boot.append(sums[index].sum() / counts[index].sum())
    assert ratio_se(list(sums), list(counts)) == pytest.approx(float(np.std(boot)), rel=0.1)


def test_scorers_report_standard_errors():
    scene = score_scene([{"question_id": f"Forest/{i}.png", "answer": "forest" if i < 3 else "lake"} for i in range(4)]
                        + [{"question_id": f"Lake/{i}.png", "answer": "lake"} for i in range(2)])
    assert scene["oa_se"] == pytest.approx(binomial_se(5 / 6, 6))
    assert scene["aa_se"] == pytest.approx(mean_of_groups_se([binomial_se(0.75, 4), 0.0]))
    vqa = score_vqa([{"question_id": i, "answer": "yes", "ground_truth": "yes" if i % 2 else "no",
                      "type": "presence" if i < 4 else "rural_urban"} for i in range(6)])
    assert vqa["se_by_type"]["presence"] == pytest.approx(binomial_se(0.5, 4))
    assert vqa["moa_se"] == pytest.approx(math.sqrt(binomial_se(0.5, 4) ** 2 + binomial_se(0.5, 2) ** 2) / 2)
