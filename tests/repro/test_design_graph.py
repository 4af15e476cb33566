"""Design 2's wiring, read off the task graph without running it: which data each arm trains on, where it starts,
what it waits for; and the command line's refusals (unknown names, a folder or results file of another design)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kd_pipeline.repro import design
from kd_pipeline.repro.__main__ import main as repro_main
from kd_pipeline.repro.runner import Runner
from kd_pipeline.repro.tasks import SeedTasks, with_dependencies

ROOT = Path(__file__).resolve().parents[2]


class RecordingRunner(Runner):
    """Records the commands a task's action would run instead of running them."""

    def __init__(self, tmp_path):
        super().__init__(state_dir=tmp_path / "state", log_dir=tmp_path / "logs")
        self.commands: list[list[str]] = []

    def python(self, task, *arguments):
        self.commands.append(list(arguments))


def train_overrides(tmp_path, condition: str) -> tuple[dict[str, dict[str, str]], dict[str, tuple[str, ...]]]:
    """{arm: {key: value}} of each arm's training command, and {task name: deps}, at the cpu scale."""
    runner = RecordingRunner(tmp_path)
    tasks = SeedTasks(runner, design.SCALES["cpu"], 5, tmp_path, (condition,)).build()
    overrides, deps = {}, {task.name: task.deps for task in tasks}
    for task in tasks:
        arm = task.name.split(".")[-1]
        if task.name.startswith(f"seed5.{condition}.") and arm in design.ARMS:
            runner.commands.clear()
            task.action(task)
            train = runner.commands[0]
            assert train[0] == "kd_pipeline.train" and runner.commands[1][0] == "kd_pipeline.export"
            overrides[arm] = dict(item.split("=", 1) for item in train[3:])
            overrides[arm]["config"] = Path(train[2]).name
    return overrides, deps


def test_unlabelled_arms_read_what_the_design_says(tmp_path):
    arms, deps = train_overrides(tmp_path, "unlabelled")
    seed = tmp_path / "seed5"
    labelled = str(seed / "sets" / f"ab_L{design.SCALES['cpu'].labelled_share:g}" / "shards")
    assert set(arms) == set(design.condition_arms("unlabelled"))
    for arm in ("A", "N", "C", "D", "F"):  # the student's own labels only
        assert arms[arm]["data.shards"] == labelled, arm
    assert arms["Pc"]["data.shards"] == str(seed / "sets" / "ab_S" / "shards")  # all of S's labels
    for arm in ("E", "E_ss"):  # prompts without answers from all of S; D_PT from the labelled share
        assert arms[arm]["data.shards"] == str(seed / "sets" / "ab_S_prompts" / "shards")
        assert arms[arm]["data.pt_shards"] == str(seed / "pt" / f"ab_L{design.SCALES['cpu'].labelled_share:g}")
        assert arms[arm]["run.init_from"] == str(seed / "runs" / "unlabelled" / "D")
        assert arms[arm]["minillm.align_weight"] == "1.0"
    assert arms["E_ss"]["minillm.long_term_weight"] == "0.0" and "minillm.long_term_weight" not in arms["E"]
    assert arms["G"]["data.shards"] == str(seed / "sets" / f"ab_G{design.SCALES['cpu'].labelled_share:g}" / "shards")
    assert arms["D"]["kd.align_weight"] == "0.0" and arms["D"]["config"] == "stage1.yaml"
    # C, D and Pc share stage 1's schedule and start; E, F and G stage 2's
    for key in ("train.max_steps", "train.lr", "train.warmup_steps", "student.path"):
        assert arms["C"][key] == arms["D"][key] == arms["Pc"][key], key
    for key in ("train.max_steps", "train.lr", "train.warmup_steps", "train.grad_accum", "train.adam_betas"):
        assert arms["E"][key] == arms["F"][key] == arms["G"][key], key
    assert arms["F"]["student.path"] == arms["G"]["student.path"] == str(seed / "models" / "unlabelled" / "C")
    assert arms["N"]["run.seed"] == str(5 + design.NEGATIVE_SEED_OFFSET) and arms["A"]["run.seed"] == "5"
    # G waits for the teacher's pseudo-labels, which wait for the teacher
    pseudo = next(dep for dep in deps["seed5.unlabelled.G"] if dep.startswith("seed5.set_ab_G"))
    assert "seed5.ab.teacher" in deps[pseudo]


def test_paper_ablations(tmp_path):
    arms, _ = train_overrides(tmp_path, "paper")
    assert set(arms) == set(design.condition_arms("paper"))
    assert arms["D_al"]["kd.align_weight"] == str(design.STAGE1_ALIGN_WEIGHT_ABLATION)
    assert arms["E0"]["minillm.align_weight"] == "0.0"
    assert arms["Pc"]["data.shards"].endswith("ab_double/shards") and arms["C"]["data.shards"].endswith("ab_S/shards")


def test_requested_arms_bring_the_arms_they_start_from():
    assert with_dependencies(("E_ss",)) == ("A", "D", "E_ss")
    assert with_dependencies(("G", "N")) == ("A", "C", "N", "G")


def run_cli(arguments, capsys) -> tuple[int, list[str]]:
    status = repro_main(arguments)
    return status, capsys.readouterr().err.strip().splitlines()


def test_unknown_names_and_other_designs_are_refused_with_one_line(tmp_path, capsys):
    out = ["--out", str(tmp_path / "out"), "--report-only"]
    for extra, message in ((["--conditions", "paper,limited"], "unknown limited"),
                           (["--arms", "E,P"], "unknown P")):
        status, lines = run_cli([*out, *extra], capsys)
        assert status == 2 and len(lines) == 1 and message in lines[0]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "design.json").write_text(json.dumps({"version": 1, "scale": "cpu"}))
    status, lines = run_cli(out, capsys)
    assert status == 2 and len(lines) == 1 and "holds a run of design 1" in lines[0]
    status, lines = run_cli([*out, "--quick"], capsys)  # same folder, another scale
    assert status == 2 and "design 1" in lines[0]
    results = ROOT / "bench" / "results" / "repro_design1_cpu.json"
    status, lines = run_cli(["--out", str(tmp_path / "fresh"), "--report-only", "--results", str(results)], capsys)
    assert status == 2 and len(lines) == 1 and "holds design 1" in lines[0] and "move that file" in lines[0]
    assert json.loads(results.read_text())["design"]["version"] == 1  # untouched


def test_every_task_of_a_seed_has_a_kind_of_time(tmp_path):
    """The timings' breakdown (results JSON, README) puts every task of the design somewhere, and nothing twice."""
    from kd_pipeline.repro.__main__ import TIME_KINDS, time_by_kind

    tasks = SeedTasks(RecordingRunner(tmp_path), design.SCALES["cpu"], 5, tmp_path, design.CONDITIONS).build()
    for task in tasks:
        kinds = [kind for kind, matches in TIME_KINDS if matches(task.name)]
        assert kinds, task.name
    totals = time_by_kind({task.name: 1.0 for task in tasks})
    assert "other" not in totals and sum(totals.values()) == len(tasks)
