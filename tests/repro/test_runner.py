"""The resumable task runner behind `make repro`: dependency order, parallelism, markers, failures and resume."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from kd_pipeline.repro.runner import Runner, Task, TaskFailed


def make_runner(tmp_path, jobs: int = 2) -> Runner:
    return Runner(state_dir=tmp_path / "state", log_dir=tmp_path / "logs", jobs=jobs)


def test_dependencies_run_first_and_independent_tasks_overlap(tmp_path):
    order, running, overlap = [], set(), []
    lock = threading.Lock()

    def action(name: str):
        def run(task: Task) -> None:
            with lock:
                running.add(name)
                overlap.append(len(running))
            time.sleep(0.2)
            with lock:
                running.discard(name)
                order.append(name)
        return run

    tasks = [Task("data", action("data")), Task("a", action("a"), ("data",)), Task("b", action("b"), ("data",)),
             Task("report", action("report"), ("a", "b"))]
    make_runner(tmp_path).run(tasks)
    assert order[0] == "data" and order[-1] == "report" and set(order[1:3]) == {"a", "b"}
    assert max(overlap) == 2  # a and b ran at the same time
    assert sorted(path.stem for path in (tmp_path / "state").glob("*.json")) == ["a", "b", "data", "report"]


def test_a_failure_stops_dependents_names_the_log_and_a_rerun_resumes(tmp_path):
    runs = []
    runner = make_runner(tmp_path, jobs=1)

    def ok(task: Task) -> None:
        runs.append(task.name)

    def fails_once(task: Task) -> None:
        runs.append(task.name)
        marker = tmp_path / "fixed"
        runner.run_command(task, [sys.executable, "-c",
                                  f"import pathlib,sys; p=pathlib.Path({str(marker)!r}); "
                                  "sys.exit(0) if p.exists() else (print('boom'), sys.exit(3))"])

    tasks = [Task("first", ok), Task("flaky", fails_once, ("first",)), Task("after", ok, ("flaky",))]
    with pytest.raises(TaskFailed, match=r"(?s)flaky failed \(exit 3\).*flaky\.log.*boom"):
        runner.run(tasks)
    assert runs == ["first", "flaky"]  # the dependent never started
    (tmp_path / "fixed").touch()
    runs.clear()
    make_runner(tmp_path, jobs=1).run(tasks)
    assert runs == ["flaky", "after"]  # the completed task is skipped


def test_exceptions_in_actions_become_task_failures_and_unknown_dependencies_are_refused(tmp_path):
    def broken(task: Task) -> None:
        raise KeyError("missing file")

    with pytest.raises(TaskFailed, match="task broken failed: KeyError"):
        make_runner(tmp_path).run([Task("broken", broken)])
    with pytest.raises(ValueError, match="unknown tasks"):
        make_runner(tmp_path).run([Task("x", broken, ("nowhere",))])


@pytest.mark.parametrize("forkserver", ["1", "0"])
def test_python_tasks_run_as_python_m_would_forked_or_not(tmp_path, monkeypatch, forkserver):
    """`Runner.python` from the preloaded fork server (or, switched off, a subprocess): the module runs as __main__
    with its arguments, the runner's environment, the repository root as working directory, the interpreter's own
    start method for its workers, stdout and stderr in the task's log, and its exit status."""
    import json

    from kd_pipeline.repro import runner as runner_module

    monkeypatch.setenv("KD_REPRO_FORKSERVER", forkserver)
    monkeypatch.setattr(runner_module, "_server_context", None)
    runner = Runner(state_dir=tmp_path / "state", log_dir=tmp_path / "logs", jobs=1, env={"KD_PROBE": "seen"})
    runner.run([Task("ok", lambda task: runner.python(task, "tests.repro.probe", "a b", "0"))])
    log = (tmp_path / "logs" / "ok.log").read_text()
    report = json.loads(next(line for line in log.splitlines() if line.startswith("PROBE "))[6:])
    assert report == {"argv": ["a b", "0"], "cwd": str(runner_module.ROOT), "env": "seen", "start_method": "fork",
                      "main": "__main__"}
    assert "to stderr" in log and log.startswith("$ ")
    with pytest.raises(TaskFailed, match=r"(?s)task bad failed \(exit 3\).*to stderr"):
        runner.run([Task("bad", lambda task: runner.python(task, "tests.repro.probe", "3"))])
