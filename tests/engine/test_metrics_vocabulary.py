"""One metric vocabulary: README's metrics.jsonl table is the code's, TensorBoard tags are grouped, unknown names are
refused. (That both stages' lines use it is checked on real runs in test_stage2_e2e.py.)"""

from pathlib import Path

import pytest

from kd_pipeline.engine.metrics import METRICS, MetricsLogger, metrics_reference, tensorboard_tag

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
START, END = "<!-- metrics-reference:start -->", "<!-- metrics-reference:end -->"


def readme_metrics() -> dict[str, set[str]]:
    """README's table parsed row by row: key -> the stages it names."""
    rows = README.split(START)[1].split(END)[0].strip().splitlines()[2:]
    parsed = {}
    for row in rows:
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        assert len(cells) == 4, f"README metrics row does not have 4 cells: {row}"
        parsed[cells[0].strip("`")] = {stage.strip() for stage in cells[1].split(",")}
    return parsed


def test_readme_lists_exactly_the_code_vocabulary():
    assert README.split(START)[1].split(END)[0].strip() == metrics_reference(), \
        "README's metrics table is stale: regenerate it from kd_pipeline.engine.metrics.metrics_reference()"
    parsed = readme_metrics()
    assert list(parsed) == list(METRICS)
    for name, stages in parsed.items():
        assert stages and stages <= {"sft", "kd_sft", "minillm"}, name
        assert stages == {stage.strip() for stage in METRICS[name].stages.split(",")}, name


def test_tensorboard_tags_are_grouped():
    assert tensorboard_tag("loss") == "train/loss" and tensorboard_tag("align") == "train/align"
    assert tensorboard_tag("val_loss") == "val/loss" and tensorboard_tag("val_rev_kl_seq") == "val/rev_kl_seq"
    assert tensorboard_tag("w_max") == "stage2/w_max" and tensorboard_tag("rev_kl") == "stage2/rev_kl"
    assert {tensorboard_tag(name).split("/")[0] for name in METRICS} == {"train", "val", "stage2"}


def test_logger_writes_grouped_tags_and_refuses_unknown_names(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(tmp_path, enabled=True, total_steps=3, start_step=0)
    logger.log(1, {"loss": 2.0, "w_max": 1.5})
    logger.log(2, {"loss": 1.0, "val_loss": 0.5})
    with pytest.raises(KeyError, match="align_loss"):
        logger.log(3, {"align_loss": 0.1})
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"train/loss", "stage2/w_max", "val/loss"}
    assert [event.value for event in events.Scalars("train/loss")] == [2.0, 1.0]
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == [
        '{"step": 1, "loss": 2.0, "w_max": 1.5}', '{"step": 2, "loss": 1.0, "val_loss": 0.5}']
