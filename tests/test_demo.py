"""`make demo`'s quick variant end to end: one seed of the experiment harness (kd_pipeline.repro) through the real
tools, the table with standard errors and image-free baselines, and a re-run that reuses every finished step."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kd_pipeline.repro import design

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_demo_runs_every_arm_and_prints_the_table_with_errors(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "kd_pipeline.demo", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=2400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    arms = results["per_seed"]["0"]["paper"]
    assert set(arms) == {*design.ARMS, "teacher", "image_free"}
    for arm in (*design.ARMS, "teacher"):
        for metric in ("scene_fc", "scene_greedy", "vqa_fc", "caption_rougeL", "grounding_miou"):
            assert 0.0 <= arms[arm][metric]["value"] <= 1.0 and arms[arm][metric]["se"] is not None
    for arm in design.ARMS:  # every student is compared with its teacher
        assert arms[arm]["kl_scene"]["value"] >= 0.0
    assert {"scene_fc", "vqa_fc", "caption_rougeL", "grounding_miou"} <= set(arms["image_free"])
    table = (tmp_path / "report.md").read_text()
    assert "| image_free |" in table and "| teacher |" in table and " ± " in table and "| D-C |" in table
    assert "Table 8" in result.stdout and "| teacher |" in result.stdout
    # the distilled student really went through both stages, from the right starting points
    seed = tmp_path / "seed0"
    for arm in ("D", "E"):
        assert json.loads((seed / "runs" / "paper" / arm / "run_status.json").read_text())["status"] == "finished"
    assert "minillm" in (seed / "runs" / "paper" / "E" / "config.yaml").read_text()
    assert str(seed / "runs" / "paper" / "D") in (seed / "runs" / "paper" / "E" / "config.yaml").read_text()
    # a second run reuses every finished step
    again = subprocess.run([sys.executable, "-m", "kd_pipeline.demo", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    tasks = len(list((tmp_path / "state").glob("*.json")))
    assert f"{tasks} of {tasks} tasks already complete" in again.stderr
