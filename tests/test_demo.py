"""`make demo`'s quick variant end to end: every phase runs the real tools and the table comes out."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_demo_runs_every_phase_and_prints_the_table(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "kd_pipeline.demo", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-4000:]
    for phase in range(1, 7):
        assert f"[demo {phase}/6]" in result.stderr
    assert "Table 3: zero-shot scene classification" in result.stdout and "Table 8" in result.stdout
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert set(results) >= {"teacher", "baseline", "distilled"}
    for model in ("teacher", "baseline", "distilled"):
        assert {"aid", "lrben", "referring", "region_captioning", "efficiency"} <= set(results[model])
        assert results[model]["aid"]["n"] > 0
    efficiency = {model: results[model]["efficiency"]["params_paper"] for model in ("teacher", "baseline", "distilled")}
    assert efficiency["teacher"] > efficiency["baseline"] == efficiency["distilled"]
    assert (tmp_path / "eval" / "report.md").is_file() and list((tmp_path / "eval").glob("*.png"))
    # the distilled student really went through both stages
    assert json.loads((tmp_path / "runs" / "stage1" / "run_status.json").read_text())["status"] == "finished"
    assert json.loads((tmp_path / "models" / "distilled" / "export.json").read_text())
    # a second run reuses every finished phase
    again = subprocess.run([sys.executable, "-m", "kd_pipeline.demo", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and again.stderr.count("already complete, skipped") == 5
