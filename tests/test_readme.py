"""README promises: the two commands first, and a config reference equal to the dataclasses' own."""

from pathlib import Path

from kd_pipeline.config import config_reference

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_first_commands_are_demo_and_test():
    code = README.split("```")[1].strip().splitlines()
    assert [line.split("#")[0].strip() for line in code] == ["make demo", "make test"]


def test_config_reference_is_current():
    start, end = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
    table = README.split(start)[1].split(end)[0].strip()
    assert table == config_reference(), "README's config reference is stale: regenerate it from config_reference()"
