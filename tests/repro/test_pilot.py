"""The pilot's rules on constructed numbers, its curve reading on a metrics.jsonl, and the design's cpu scale
carrying exactly the committed pilot's choice (a design that drifted from its pilot would fail here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kd_pipeline.repro import design, pilot

ROOT = Path(__file__).resolve().parents[2]


def test_the_largest_share_whose_labels_matter_is_chosen():
    results = {"0.25": {"pc_minus_c": 0.021}, "0.125": {"pc_minus_c": 0.048}, "0.0625": {"pc_minus_c": 0.09}}
    assert pilot.choose_share(results) == (0.125, True)
    assert pilot.choose_share({"0.25": {"pc_minus_c": 0.031}, "0.125": {"pc_minus_c": 0.05}}) == (0.25, True)
    assert pilot.choose_share({"0.25": {"pc_minus_c": 0.01}, "0.125": {"pc_minus_c": 0.02}}) == (0.125, False)


def test_a_curve_is_read_from_the_runs_validation_lines(tmp_path):
    lines = [{"step": 0, "val_loss": 0.50}, {"step": 1, "reward": -0.3, "rev_kl": 0.4},
             {"step": 5, "val_loss": 0.40, "rev_kl": 0.35}, {"step": 10, "val_loss": 0.42}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    curve = pilot.read_curve(tmp_path)
    assert curve["curve"] == [(0, 0.5), (5, 0.4), (10, 0.42)]
    assert curve["best"] == 0.4 and curve["best_step"] == 5 and curve["reduction"] == pytest.approx(0.2)
    assert curve["telemetry"]["rev_kl"] == [(1, 0.4), (5, 0.35)]


def test_the_design_carries_the_committed_pilot_choice():
    committed = ROOT / "bench" / "results" / "repro_pilot_cpu.json"
    choice = json.loads(committed.read_text())["choice"]
    cpu = design.SCALES["cpu"]
    assert (cpu.labelled_share, cpu.stage2_lr, cpu.stage2_steps) == (
        choice["labelled_share"], choice["stage2_lr"], choice["stage2_steps"])
    assert json.loads(committed.read_text())["seed"] == design.PILOT_SEED not in design.DEFAULT_SEEDS
