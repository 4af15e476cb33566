"""`make demo`'s quick variant end to end: one seed of the experiment harness (kd_pipeline.repro, design 2's
`unlabelled` condition) through the real tools, the table with standard errors and image-free baselines, the
verdict, and a re-run that reuses every finished step."""

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
    assert results["design"]["version"] == design.DESIGN_VERSION and results["design"]["conditions"] == ["unlabelled"]
    arms = results["per_seed"]["0"]["unlabelled"]
    assert set(arms) == {*design.condition_arms("unlabelled"), "teacher", "image_free"}
    for arm in (*design.condition_arms("unlabelled"), "teacher"):
        for metric in ("scene_fc", "vqa_fc", "caption_rougeL"):
            assert 0.0 <= arms[arm][metric]["value"] <= 1.0 and arms[arm][metric]["se"] is not None
    for arm in design.condition_arms("unlabelled"):  # every student is compared with its teacher
        assert arms[arm]["kl_scene"]["value"] >= 0.0
    assert {"scene_fc", "vqa_fc", "caption_rougeL"} <= set(arms["image_free"])
    table = (tmp_path / "report.md").read_text()
    for row in ("| image_free |", "| teacher |", "| E-F |", "| Pc-C |", "| E-G |", "| E-E_ss |", "Recovered share",
                "Pass rule"):
        assert row in table, row
    assert "Table 8" in result.stdout and "| teacher |" in result.stdout and "Pass rule" in result.stdout
    # the distilled student really went through both stages from the right starts, on prompts without answers
    seed = tmp_path / "seed0"
    for arm in ("D", "E", "E_ss", "G"):
        assert json.loads((seed / "runs" / "unlabelled" / arm / "run_status.json").read_text())["status"] == "finished"
    stage2 = (seed / "runs" / "unlabelled" / "E" / "config.yaml").read_text()
    assert "minillm" in stage2 and str(seed / "runs" / "unlabelled" / "D") in stage2 and "ab_S_prompts" in stage2
    manifest = json.loads((seed / "sets" / "ab_S_prompts" / "shards" / "manifest.json").read_text())
    assert manifest["kind"] == "prompts"
    share = f"{design.SCALES['quick'].labelled_share:g}"
    labelled = json.loads((seed / "sets" / f"ab_L{share}" / "instruct.json").read_text())
    pseudo = json.loads((seed / "sets" / f"ab_G{share}" / "pseudo.json").read_text())
    assert len(labelled) == round(design.SCALES["quick"].records * design.SCALES["quick"].labelled_share)
    assert 0 < len(pseudo) <= design.SCALES["quick"].records - len(labelled)  # the teacher answered the rest
    # a second run reuses every finished step
    again = subprocess.run([sys.executable, "-m", "kd_pipeline.demo", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    tasks = len(list((tmp_path / "state").glob("*.json")))
    assert f"{tasks} of {tasks} tasks already complete" in again.stderr
