"""README promises: the two commands first, a config reference equal to the dataclasses' own, and a results table
equal to what the committed bench/results/repro_cpu.json gives."""

import json
from pathlib import Path

from kd_pipeline.config import config_reference
from kd_pipeline.repro import report

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_first_commands_are_demo_and_test():
    code = README.split("```")[1].strip().splitlines()
    assert [line.split("#")[0].strip() for line in code] == ["make demo", "make test"]


def test_config_reference_is_current():
    start, end = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
    table = README.split(start)[1].split(end)[0].strip()
    assert table == config_reference(), "README's config reference is stale: regenerate it from config_reference()"


def test_results_block_is_the_report_of_the_committed_json():
    """The 5-seed table and verdict in README are report.markdown of repro_cpu.json's summary, verbatim: a re-run
    that rewrites the JSON without the README (or a hand edit of a number) fails here."""
    block = README.split("<!-- repro-results:start -->")[1].split("<!-- repro-results:end -->")[0]
    summary = json.loads((ROOT / "bench" / "results" / "repro_cpu.json").read_text())["summary"]
    assert report.markdown(summary) in block, "README's results are stale: regenerate them from repro_cpu.json"


def test_pilot_tables_are_those_of_the_committed_pilot_json():
    """README's tables of how design 2's sizes were chosen are pilot.markdown of repro_pilot_cpu.json, verbatim."""
    from kd_pipeline.repro import pilot

    results = json.loads((ROOT / "bench" / "results" / "repro_pilot_cpu.json").read_text())
    for table in pilot.markdown(results):
        assert "\n".join("   " + line for line in table.splitlines()) in README, "README's pilot tables are stale"
