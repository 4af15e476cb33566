"""The end-of-step policy both recipes share: validation, best, logging, stopping (stop_at_step once), saving."""

from types import SimpleNamespace

import pytest

from kd_pipeline.checkpoint import TrainerState
from kd_pipeline.config import load_config
from kd_pipeline.recipes.common import StepEnd


class Recorder:
    """Stands in for the metrics logger, the stop controller and the save/validate callbacks."""

    def __init__(self, val_losses=None, signal_at=None):
        self.logged, self.validated, self.saved, self.progress = [], [], [], []
        self.val_losses = dict(val_losses or {})
        self.signal_at = signal_at
        self.state = None

    def log(self, step, record):
        self.logged.append(step)

    def should_stop(self):
        return self.state.step == self.signal_at

    def validate(self):
        self.validated.append(self.state.step)
        return {"val_loss": self.val_losses.get(self.state.step, 1.0)}

    def save(self):
        self.saved.append(self.state.step)


def run_steps(overrides, *, start=0, until=None, **recorder_args):
    """Drive StepEnd like a recipe from ``start``; returns (recorder, state, the step it stopped at or None)."""
    config = load_config(None, overrides)
    recorder = Recorder(**recorder_args)
    recorder.state = state = TrainerState(step=start)
    session = SimpleNamespace(config=config, state=state, stopper=recorder,
                              metrics=SimpleNamespace(log=recorder.log, progress=lambda *_: None, enabled=True))
    end_of_step = StepEnd(session, validate=recorder.validate, save=recorder.save)
    for step in range(start + 1, (until or config.train.max_steps) + 1):
        state.step = step
        if end_of_step({"loss": 1.0}):
            return recorder, state, step
    return recorder, state, None


CADENCE = ["train.max_steps=10", "train.eval_every=4", "checkpoint.every_steps=3", "run.log_every=5"]


def test_cadences_and_best():
    recorder, state, stopped = run_steps(CADENCE, val_losses={4: 0.9, 8: 0.95, 10: 0.5})
    assert stopped is None
    assert recorder.validated == [4, 8, 10]
    assert recorder.logged == [1, 4, 5, 8, 10]  # step 1, every 5 steps, every validation, the last step
    assert recorder.saved == [3, 4, 6, 9, 10]  # every 3 steps, each new best (4; not 8), the last step
    assert state.best_val_loss == 0.5 and state.best_tag == "step_00000010"


@pytest.mark.parametrize("start,expected_stop", [(0, 6), (3, 6), (6, None), (8, None)])
def test_stop_at_step_stops_once(start, expected_stop):
    """The run that reaches stop_at_step stops there (and saves); a run resumed at or past it goes on."""
    recorder, state, stopped = run_steps([*CADENCE, "run.stop_at_step=6"], start=start)
    assert stopped == expected_stop
    if expected_stop:
        assert recorder.saved[-1] == 6
    else:
        assert state.step == 10 and recorder.saved[-1] == 10


def test_a_signal_stops_and_saves_off_cadence():
    recorder, _, stopped = run_steps(CADENCE, signal_at=5)
    assert stopped == 5 and recorder.saved == [3, 4, 5]


def test_eval_every_zero_never_validates():
    recorder, state, _ = run_steps(["train.max_steps=4", "train.eval_every=0", "checkpoint.every_steps=2"])
    assert recorder.validated == [] and state.best_tag is None and recorder.saved == [2, 4]


def test_step_one_is_logged_with_each_terms_share_of_the_loss(caplog):
    """A term that dominates is visible at the first step: the line names each loss_* term with its share."""
    config = load_config(None, ["train.max_steps=3", "run.log_every=10", "train.eval_every=0"])
    logged = []
    state = TrainerState(step=0)
    session = SimpleNamespace(config=config, state=state, stopper=SimpleNamespace(should_stop=lambda: False),
                              metrics=SimpleNamespace(log=lambda step, record: logged.append(step),
                                                      progress=lambda *_: None, enabled=True))
    end_of_step = StepEnd(session, validate=dict, save=lambda: None)
    with caplog.at_level("INFO", logger="kd_pipeline.recipes.common"):
        for step in (1, 2):
            state.step = step
            end_of_step({"loss": 2.0, "loss_ce": 0.5, "loss_align": 1.5, "ce": 1.0, "align": 1.5})
    assert logged == [1]
    lines = [record.getMessage() for record in caplog.records if "loss terms" in record.getMessage()]
    assert lines == ["step 1 loss terms (weight x term): ce 0.5 (25 %), align 1.5 (75 %) = loss 2"]
