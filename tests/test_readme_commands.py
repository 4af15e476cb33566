"""What README and the shipped configs promise an operator: every file they name exists, every shipped config loads,
plans and states its batch arithmetic truthfully, and every command README shows works as written.

Each README command is covered in one of two ways (``COVERAGE``; a command this table does not know fails the test,
so a new README command needs a decision here):
- ``run``: executed as written in a scratch checkout, once the inputs README tells the reader to make exist: the
  data_prep commands on a synthetic world (``data_prep synth --num 2000`` shrunk to 200 records in a second world,
  and the placeholders GeoChat_Instruct.json, IMAGES, ... mapped onto the tiny run's world), ``plan`` exactly as written, the tiny
  ``local_distill.sh`` run (Ctrl-C after its first step, then the same command again to resume and finish), and the
  array-job submitter under stand-in Slurm tools;
- ``parse``: commands that need real GeoChat checkpoints, 8 GPUs or trained models are driven up to the point where
  their arguments and configuration are validated: the CLI must get past argument parsing and stop, exit 2, at the
  first missing input; ``deepspeed``/``sbatch`` lines have their config loaded and its batch arithmetic checked
  against the GPUs the line (or the script's #SBATCH header) gives.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kd_pipeline.config import load_config
from kd_pipeline.plan import check_batch, make_plan

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
REPO_PATH = re.compile(r"(?<![\w/.-])((?:configs|launch|ds_configs|kd_pipeline|data_prep|bench|tests)/[\w./-]*\w)")
PROGRAMS = ("python", "deepspeed", "launch/", "sbatch", "bash", "mkdir", "make")

COVERAGE = {
    # The whole demo / suite / experiment: `make test` runs this very test; each target is checked to exist.
    "make demo": "parse", "make test": "parse", "make repro": "parse",
    "python -m data_prep synth": "run", "python -m data_prep shard": "run", "python -m data_prep verify": "run",
    "python -m data_prep preview": "run", "python -m data_prep bench": "run", "python -m data_prep pt": "run",
    "python -m data_prep tokenizer": "run", "python -m kd_pipeline.plan": "run",
    "launch/local_distill.sh": "run", "bash launch/slurm_data_prep.sh": "run", "mkdir -p": "run",
    "python -m kd_pipeline.convert": "parse", "python -m kd_pipeline.export": "parse",
    "python -m kd_pipeline.eval": "parse", "deepspeed --num_gpus": "parse", "sbatch launch/slurm_distill.sh": "parse",
}
# The inputs README's data engineer's guide names by placeholder, made by the commands of its tiny-run block.
PLACEHOLDERS = {"GeoChat_Instruct.json": "world/instruct.json", "AID_IMAGES": "world/bench/images",
                "IMAGES": "world/images", "TOKENIZER": "world/tokenizer", "aid.jsonl": "world/bench/scene.jsonl",
                "corpus.txt": "world/pt_corpus.txt", "--out world --num 2000": "--out world_2 --num 200",
                # The experiment's world at toy sizes: the same options, seconds instead of a minute.
                "--num 4000": "--num 300",
                "scene=1000,vqa=999,region_captioning=500,referring=50": "scene=40,vqa=30,region_captioning=20,referring=10"}


def readme_commands() -> list[str]:
    """Every command line of README's code blocks: continuations joined, comments and `&&` chains split."""
    commands = []
    for block in README.split("```")[1::2]:
        language, _, block = block.partition("\n")
        if language.strip() not in ("", "bash", "sh", "shell"):  # e.g. a ```python example: code, not commands
            continue
        joined = re.sub(r"\\\n\s*", "", block)
        for line in joined.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            for part in (piece.strip() for piece in line.split("&&")):
                if part.startswith(PROGRAMS):
                    commands.append(part)
    return commands


def coverage_key(command: str) -> str:
    matches = [key for key in COVERAGE if command.startswith(key)]
    return max(matches, key=len) if matches else ""


def runnable(command: str) -> list[str]:
    """The command with its optional [...] parts dropped and README's placeholders mapped onto the tiny world."""
    command = re.sub(r"\s*\[[^\]]*\]", "", command)
    for placeholder, value in PLACEHOLDERS.items():
        command = re.sub(rf"(?<![\w/]){re.escape(placeholder)}(?![\w/])", value, command)
    words = shlex.split(command)
    return [sys.executable, *words[1:]] if words[0] == "python" else words


def test_every_readme_command_is_covered():
    commands = readme_commands()
    assert len(commands) > 20
    assert [command for command in commands if not coverage_key(command)] == []
    assert {coverage_key(command) for command in commands} == set(COVERAGE), "COVERAGE names a command README lost"


def test_files_named_in_readme_and_config_headers_exist():
    texts = {"README.md": README}
    for path in CONFIGS:
        texts[str(path.relative_to(ROOT))] = "\n".join(line for line in path.read_text().splitlines()
                                                        if line.startswith("#"))
    named = {(where, match.rstrip(".")) for where, text in texts.items() for match in REPO_PATH.findall(text)}
    assert len(named) > 20
    # bench/results/ holds outputs: a benchmark not run yet on this hardware (the GPU ones) has none to show.
    missing = sorted((where, name) for where, name in named
                     if not (ROOT / name).exists() and not name.startswith("bench/results/"))
    assert missing == []
    modules = {module for text in texts.values() for module in re.findall(r"python -m ([\w.]+)", text)}
    def exists(module: str) -> bool:
        return any((ROOT / module.replace(".", "/")).with_suffix(suffix).exists() for suffix in (".py", ""))

    assert {module for module in modules if not exists(module)} == set()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: str(path.relative_to(ROOT)))
def test_shipped_config_loads_plans_and_states_its_batch_arithmetic(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    config = load_config(path)
    per_rank = config.train.micro_batch_size * config.train.grad_accum
    world_size = config.train.global_batch_size // per_rank if config.train.global_batch_size else 1
    plan = make_plan(config, world_size=world_size, gpu_memory_gib=80)
    assert plan["phases"]["peak"] > 0 and plan["verdict"]["fits"] is not None
    stated = re.search(r"Batch arithmetic: (\d+) samples x (\d+) accumulation x (\d+) (?:GPUs|ranks) = (\d+)",
                       path.read_text())
    if stated:
        micro, accum, ranks, total = map(int, stated.groups())
        assert (micro, accum, micro * accum * ranks) == (config.train.micro_batch_size, config.train.grad_accum,
                                                         total)
        assert config.train.global_batch_size in (0, total)
    if config.train.global_batch_size:
        assert stated, "a config with train.global_batch_size states its batch arithmetic in its header"
        check_batch(config, world_size)


# ----------------------------------------------------------------------------------------------------- parse


def sbatch_allocation(script: Path) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", script.read_text(), re.MULTILINE))


def test_launch_commands_agree_with_their_configs(monkeypatch):
    """`deepspeed --num_gpus N ... --config C` and `sbatch launch/slurm_distill.sh C` (with the script's default
    allocation): the config loads, and the ranks give the global batch it was designed for."""
    monkeypatch.chdir(ROOT)
    allocation = sbatch_allocation(ROOT / "launch" / "slurm_distill.sh")
    sbatch_ranks = int(allocation["nodes"]) * int(allocation["ntasks-per-node"])
    assert allocation["gpus-per-node"] == allocation["ntasks-per-node"]  # one task (rank) per GPU
    checked = 0
    for command in readme_commands():
        words = shlex.split(re.sub(r"\s*\[[^\]]*\]", "", command))
        if words[0] == "deepspeed":
            world_size = int(words[words.index("--num_gpus") + 1])
        elif words[:2] == ["sbatch", "launch/slurm_distill.sh"]:
            world_size = sbatch_ranks
        else:
            continue
        config_path = words[words.index("--config") + 1] if "--config" in words else words[2]
        config = load_config(config_path)
        assert config.train.global_batch_size, f"{config_path} states no train.global_batch_size"
        check_batch(config, world_size)
        checked += 1
    assert checked >= 3


def test_make_commands_are_makefile_targets():
    """`make demo`, `make test`, `make repro`: each names a real target (`make -n` plans it without running it)."""
    targets = [command.split()[1] for command in readme_commands() if command.startswith("make ")]
    assert {"demo", "test", "repro"} <= set(targets)
    for target in targets:
        result = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, (target, result.stderr)
        assert "kd_pipeline" in result.stdout or "pytest" in result.stdout, (target, result.stdout)


@pytest.mark.parametrize("key", [key for key, how in COVERAGE.items() if how == "parse" and key.startswith("python")])
def test_commands_needing_real_models_get_past_their_argument_parsing(key, tmp_path):
    commands = [command for command in readme_commands() if coverage_key(command) == key]
    assert commands
    for command in commands:
        result = subprocess.run(runnable(command), cwd=tmp_path, capture_output=True, text=True, timeout=300,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        output = result.stdout + result.stderr
        assert result.returncode == 2, output[-3000:]
        assert not re.search(r"usage:|unrecognized arguments|invalid choice|the following arguments are required",
                             output), output[-3000:]
        assert re.search(r"does not exist|not found|no such|missing|has no", output, re.IGNORECASE), output[-3000:]


# ----------------------------------------------------------------------------------------------------- run


def test_plan_commands_run_as_written(capsys, monkeypatch):
    from kd_pipeline.plan import main as plan

    monkeypatch.chdir(ROOT)
    commands = [command for command in readme_commands() if coverage_key(command) == "python -m kd_pipeline.plan"]
    assert len(commands) >= 2
    for command in commands:
        assert plan(runnable(command)[3:]) == 0
        assert capsys.readouterr().out.count("verdict (--gpu-memory-gib): fits") == 2


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A scratch folder laid out like the repository root (README's commands run from there)."""
    root = tmp_path_factory.mktemp("checkout")
    for name in ("configs", "ds_configs", "launch"):
        (root / name).symlink_to(ROOT / name)
    return root


def run_in(checkout: Path, command: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=checkout, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})


@pytest.mark.slow
def test_data_and_local_training_commands_run_as_written(checkout, tmp_path):
    from tests.engine.launch import free_port
    from tests.hpc.conftest import make_cluster, terminal_signals

    commands = [command for command in readme_commands() if COVERAGE.get(coverage_key(command)) == "run"
                and coverage_key(command) not in ("python -m kd_pipeline.plan", "launch/local_distill.sh",
                                                  "bash launch/slurm_data_prep.sh")]
    # The tiny-run block (synth, shard, tokenizer) first: it makes the world the data engineer's lines then use.
    tiny_block = README.split("A tiny run on one machine")[1].split("```")[1]
    first = [line.strip() for line in tiny_block.splitlines() if line.strip().startswith("python")]
    for command in first + [command for command in commands if command not in first]:
        result = run_in(checkout, runnable(command))
        assert result.returncode == 0, (command, (result.stdout + result.stderr)[-3000:])

    (local,) = [command for command in readme_commands() if coverage_key(command) == "launch/local_distill.sh"]
    env = {"KD_PYTHON": sys.executable, "KD_REPO": str(checkout), "MASTER_PORT": str(free_port()),
           "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    metrics = checkout / "runs" / "tiny_cpu" / "metrics.jsonl"
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(runnable(local), cwd=checkout, stdout=log, stderr=subprocess.STDOUT,
                                 env={**os.environ, "PYTHONPATH": str(ROOT), **env}, start_new_session=True,
                                 preexec_fn=terminal_signals)
        try:
            deadline = 600
            while not (metrics.is_file() and metrics.read_text().strip()) and first.poll() is None and deadline:
                subprocess.run(["sleep", "1"])
                deadline -= 1
            os.killpg(first.pid, signal.SIGINT)  # Ctrl-C, as a terminal sends it to the foreground job
            assert first.wait(timeout=600) == 75, (tmp_path / "first.log").read_text()[-3000:]
        finally:
            if first.poll() is None:
                first.kill()
    assert "INT received: asking the ranks to save and stop" in (tmp_path / "first.log").read_text()
    latest = (checkout / "runs" / "tiny_cpu" / "checkpoints" / "latest").read_text()
    second = run_in(checkout, runnable(local), **{**env, "MASTER_PORT": str(free_port())})
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    assert f"at step {int(latest[-8:])}" in second.stderr
    steps = [line for line in metrics.read_text().splitlines() if line.strip()]
    assert '"step": 20' in steps[-1]

    (submit,) = [command for command in readme_commands() if coverage_key(command) == "bash launch/slurm_data_prep.sh"]
    cluster = make_cluster(tmp_path / "cluster")
    result = run_in(checkout, runnable(submit), PATH=f"{cluster.bin_dir}{os.pathsep}{os.environ['PATH']}",
                    KD_FAKE_SLURM_LOG=str(cluster.log_path), KD_REPO=str(ROOT), KD_PYTHON=sys.executable)
    assert result.returncode == 0, result.stderr[-3000:]
    array, merge = cluster.calls("sbatch")
    assert array["argv"][1] == "--array=0-15" and "--dependency=afterok:" + str(array["job_id"]) in merge["argv"]
