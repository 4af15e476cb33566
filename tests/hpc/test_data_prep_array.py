"""launch/slurm_data_prep.sh: the submitter's two sbatch calls, array tasks writing disjoint shares of one plan in
parallel, a failed task caught by the merge and redone, and the merged output equal to a one-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.sharding import PROGRESS_DIR
from tests.hpc.conftest import ROOT, start_script

NUM_TASKS = 3


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[str]:
    """A small synthetic world; returns the shard arguments every task and the reference run share."""
    from data_prep.__main__ import main as data_prep

    root = tmp_path_factory.mktemp("array_world")
    assert data_prep(["synth", "--out", str(root), "--num", "60", "--seed", "3", "--bench-num", "2",
                      "--pt-lines", "10"]) == 0
    return ["--instruct", str(root / "instruct.json"), "--images", str(root / "images"), "--val-fraction", "0.1",
            "--max-shard-samples", "5", "--seed", "3"]


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("array_reference") / "shards"
    result = subprocess.run([sys.executable, "-m", "data_prep", "shard", *inputs, "--out", str(out), "--workers", "1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def outputs(out: Path) -> dict[str, bytes]:
    """Every file but the progress records (which only a task writes)."""
    return {str(path.relative_to(out)): path.read_bytes() for path in sorted(out.rglob("*"))
            if path.is_file() and PROGRESS_DIR not in path.parts}


def role_env(fake_cluster, **variables: str) -> dict:
    env = fake_cluster.env(nodes=1, nproc_per_node=1, extra={"KD_PYTHON": sys.executable, **variables})
    return {key: value for key, value in env.items() if value != ""}


def run_tasks(fake_cluster, inputs: list[str], out: Path, task_ids: list[int], **variables: str) -> list[str]:
    """Array tasks ``task_ids`` as the submitter queues them, all at the same time (as Slurm runs them); returns
    their outputs."""
    started = []
    for task in task_ids:
        env = role_env(fake_cluster, SLURM_ARRAY_TASK_ID=str(task), SLURM_ARRAY_TASK_COUNT=str(NUM_TASKS),
                       SLURM_CPUS_PER_TASK="1", **{"KD_DATA_PREP_SUBMITTED": "1", **variables})
        log_file = fake_cluster.root / f"task{task}.log"
        started.append((start_script("slurm_data_prep.sh", [*inputs, "--out", str(out)], env, log_file), log_file))
    logs = []
    for process, log_file in started:
        assert process.wait(timeout=300) == 0, log_file.read_text()[-3000:]
        logs.append(log_file.read_text())
    return logs


def merge(fake_cluster, inputs: list[str], out: Path) -> tuple[int, str]:
    log_file = fake_cluster.root / "merge.log"
    process = start_script("slurm_data_prep.sh", [*inputs, "--out", str(out)],
                           role_env(fake_cluster, KD_DATA_PREP_MERGE="1"), log_file)
    return process.wait(timeout=300), log_file.read_text()


def test_submitter_submits_the_array_then_a_merge_that_depends_on_it(fake_cluster, inputs, tmp_path):
    args = [*inputs, "--out", str(tmp_path / "shards")]
    log_file = tmp_path / "submit.log"
    process = start_script("slurm_data_prep.sh", ["--tasks", str(NUM_TASKS), "--", *args],
                           role_env(fake_cluster, SLURM_JOB_ID=""), log_file)
    assert process.wait(timeout=60) == 0, log_file.read_text()
    script = str(ROOT / "launch" / "slurm_data_prep.sh")
    array, merge_job = fake_cluster.calls("sbatch")
    assert array["argv"] == ["--parsable", f"--array=0-{NUM_TASKS - 1}", "--export=ALL,KD_DATA_PREP_SUBMITTED=1",
                             script, *args]
    assert merge_job["argv"][:3] == ["--parsable", f"--dependency=afterok:{array['job_id']}",
                                     "--export=ALL,KD_DATA_PREP_MERGE=1"]
    assert merge_job["argv"][-len(args) - 1:] == [script, *args]
    assert f"array job {array['job_id']} ({NUM_TASKS} tasks) and merge job {merge_job['job_id']}" in \
        log_file.read_text()
    assert not (tmp_path / "shards").exists()  # the submitter itself writes nothing


def test_an_array_submitted_by_hand_queues_its_own_merge_once(fake_cluster, inputs, tmp_path):
    """README's `sbatch --array=0-15 launch/slurm_data_prep.sh ...`: the first task queues the merge job after the
    whole array; the other tasks, and the first one when requeued, do not."""
    args = [*inputs, "--out", str(tmp_path / "shards")]
    by_hand = {"KD_DATA_PREP_SUBMITTED": "", "SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_MIN": "0"}
    logs = run_tasks(fake_cluster, inputs, tmp_path / "shards", [0, 1, 2], **by_hand)
    (merge_job,) = fake_cluster.calls("sbatch")
    assert merge_job["argv"][:3] == ["--parsable", "--dependency=afterok:77", "--export=ALL,KD_DATA_PREP_MERGE=1"]
    assert merge_job["argv"][-len(args) - 1:] == [str(ROOT / "launch" / "slurm_data_prep.sh"), *args]
    assert f"submitted merge job {merge_job['job_id']}" in logs[0]
    run_tasks(fake_cluster, inputs, tmp_path / "shards", [0], **by_hand, SLURM_RESTART_COUNT="1")
    assert len(fake_cluster.calls("sbatch")) == 1


def test_parallel_tasks_and_merge_equal_one_process_run(fake_cluster, inputs, reference, tmp_path):
    out = tmp_path / "shards"
    logs = run_tasks(fake_cluster, inputs, out, list(range(NUM_TASKS)))
    planned = sorted(name for name in outputs(reference) if name.endswith(".tar"))
    assert len(planned) > NUM_TASKS
    for task, log in enumerate(logs):
        share = planned_share(reference, task)
        assert f"task {task} of {NUM_TASKS}: {len(share)} of {len(planned)} shards" in log
    assert not (out / "manifest.json").exists()  # only the merge writes it
    code, log = merge(fake_cluster, inputs, out)
    assert code == 0, log[-3000:]
    assert outputs(out) == outputs(reference)
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]


def planned_share(reference: Path, task: int) -> list[str]:
    """Task ``task``'s shards: every NUM_TASKS-th of the plan, in plan order (train shards, then val)."""
    plan = [entry["name"] for entry in json.loads((reference / "manifest.json").read_text())["shards"]]
    return plan[task::NUM_TASKS]


def test_merge_names_the_shards_of_a_failed_task_and_a_rerun_completes(fake_cluster, inputs, reference, tmp_path):
    out = tmp_path / "shards"
    run_tasks(fake_cluster, inputs, out, [0, 2])  # task 1 failed
    code, log = merge(fake_cluster, inputs, out)
    missing = planned_share(reference, 1)
    assert code == 1 and f"{len(missing)} of" in log and missing[0] in log, log[-3000:]
    assert not (out / "manifest.json").exists()
    before = {path.name: path.stat().st_mtime_ns for path in out.glob("*.tar")}
    run_tasks(fake_cluster, inputs, out, [1, 0])  # the failed task, and a requeued finished one
    after = {path.name: path.stat().st_mtime_ns for path in out.glob("*.tar")}
    assert {name: after[name] for name in before} == before, "a rerun task must reuse its verified shards"
    code, log = merge(fake_cluster, inputs, out)
    assert code == 0, log[-3000:]
    assert outputs(out) == outputs(reference)
