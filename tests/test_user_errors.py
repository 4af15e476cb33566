"""Every CLI turns bad input (a ``kd_pipeline.errors.UserError``) into exit 2 and ONE line on stderr that names the
key or file, without a traceback; ``train`` finds all of it before any model exists.

The ``train`` cases call the CLI's ``main`` with the process-group start-up (``runtime.init_runtime``) and model
construction (``models.create_model``) replaced by a raise of ``ReachedStartUp``: a check that fired only after
start-up fails the test, and a control case shows that a good config does get there. One case runs the real command
in a subprocess, unpatched, with GeoChat-13B/7B architectures whose construction would take minutes; the slow case
trains on shards without a val split.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


class ReachedStartUp(Exception):
    """Raised where the run would start the process group or build a model."""


@pytest.fixture
def guarded(monkeypatch):
    """``kd_pipeline.train.main`` that raises ReachedStartUp instead of starting up."""
    import kd_pipeline.models
    import kd_pipeline.runtime
    from kd_pipeline.train import main

    def reached(*args, **kwargs):
        raise ReachedStartUp

    monkeypatch.setattr(kd_pipeline.runtime, "init_runtime", reached)
    monkeypatch.setattr(kd_pipeline.models, "create_model", reached)
    return main


def run_main(main, argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


def run_cli(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    """``python -m ARGS`` in a fresh process (one rank, CPU)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(code: int, stderr: str, *needles: str, only_line: bool = False) -> str:
    """Exit 2, exactly one ``error:`` line holding every needle, no traceback; returns the line."""
    assert code == 2, (code, stderr[-3000:])
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr[-3000:]
    if only_line:
        assert stderr.strip() == lines[0], stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def train_args(synth_data: dict, output_dir: Path, *overrides: str) -> list[str]:
    return ["--config", str(REPO / "configs" / "tiny_cpu.yaml"), f"data.shards={synth_data['shards']}",
            f"data.tokenizer={synth_data['tokenizer']}", f"data.pt_shards={synth_data['pt_shards']}",
            f"run.output_dir={output_dir}", *overrides]


def stage2(*overrides: str) -> list[str]:
    return ["run.stage=minillm", "train.micro_batch_size=2", "minillm.rollouts_per_rank=4", *overrides]


@pytest.fixture(scope="module")
def train_only_shards(synth_data, tmp_path_factory):
    """The synthetic instructions sharded without a val split."""
    from data_prep.__main__ import main as data_prep

    out = tmp_path_factory.mktemp("train_only") / "shards"
    synth = synth_data["synth"]
    assert data_prep(["shard", "--instruct", str(synth / "instruct.json"), "--images", str(synth / "images"),
                      "--out", str(out), "--val-fraction", "0", "--max-shard-samples", "80", "--workers", "1"]) == 0
    return out


# ----------------------------------------------------------------------------------------------------- train


def test_a_good_config_reaches_start_up(guarded, synth_data, tmp_path):
    """The control: with nothing wrong the run gets to start-up, so the exits 2 below come from checks before it."""
    with pytest.raises(ReachedStartUp):
        guarded(train_args(synth_data, tmp_path))
    with pytest.raises(ReachedStartUp):
        guarded(train_args(synth_data, tmp_path, *stage2(f"run.init_from={make_stage1_checkpoint(tmp_path)}")))


def make_stage1_checkpoint(tmp_path: Path) -> Path:
    """A folder that passes stage 2's init_from check (a marker listing no files): the guard stops before its
    weights would be read."""
    folder = tmp_path / "stage1" / "checkpoints" / "step_00000004"
    folder.mkdir(parents=True)
    (folder / "COMPLETE.json").write_text(json.dumps({"tag": folder.name, "step": 4, "files": {}}))
    (folder.parent / "best").write_text(folder.name)
    return tmp_path / "stage1"


def test_config_error_stage2_batch_arithmetic(guarded, synth_data, tmp_path, capsys):
    argv = train_args(synth_data, tmp_path, *stage2("minillm.rollouts_per_rank=3", f"run.init_from={tmp_path}"))
    assert_one_line_error(*run_main(guarded, argv, capsys), "minillm.rollouts_per_rank=3", "train.micro_batch_size=2",
                          only_line=True)


def test_config_error_unknown_key(guarded, synth_data, tmp_path, capsys):
    argv = train_args(synth_data, tmp_path, "train.eval_evry=3")
    assert_one_line_error(*run_main(guarded, argv, capsys), "train.eval_evry", "eval_every", only_line=True)


def test_manifest_error_missing_val_split_unless_validation_is_off(guarded, synth_data, train_only_shards, tmp_path,
                                                                   capsys):
    argv = train_args(synth_data, tmp_path, f"data.shards={train_only_shards}")
    assert_one_line_error(*run_main(guarded, argv, capsys), f"data.shards={train_only_shards}", "'val'",
                          "train.eval_every=0", only_line=True)
    with pytest.raises(ReachedStartUp):
        guarded([*argv, "train.eval_every=0"])


def test_manifest_error_stage2_pt_shards(guarded, synth_data, tmp_path, capsys):
    argv = train_args(synth_data, tmp_path, *stage2(f"data.pt_shards={synth_data['shards']}",
                                                    f"run.init_from={make_stage1_checkpoint(tmp_path)}"))
    assert_one_line_error(*run_main(guarded, argv, capsys), f"data.pt_shards={synth_data['shards']}", "'pretrain'",
                          only_line=True)


def test_tokenizer_error(guarded, synth_data, tmp_path, capsys):
    argv = train_args(synth_data, tmp_path, f"data.tokenizer={synth_data['shards']}")
    assert_one_line_error(*run_main(guarded, argv, capsys), f"data.tokenizer: {synth_data['shards']}",
                          "tokenizer.model", only_line=True)


def test_model_error_student_path_without_config(guarded, synth_data, tmp_path, capsys):
    (tmp_path / "not_a_model").mkdir()
    argv = train_args(synth_data, tmp_path / "run", f"student.path={tmp_path / 'not_a_model'}")
    assert_one_line_error(*run_main(guarded, argv, capsys), f"student.path={tmp_path / 'not_a_model'}", "config.json",
                          only_line=True)


def test_checkpoint_error_stage2_init_from(guarded, synth_data, tmp_path, capsys):
    argv = train_args(synth_data, tmp_path, *stage2(f"run.init_from={tmp_path / 'stage1'}"))
    assert_one_line_error(*run_main(guarded, argv, capsys), f"run.init_from={tmp_path / 'stage1'}", "does not exist",
                          only_line=True)


def test_loader_state_error_resume_with_another_seed(guarded, synth_data, tmp_path, capsys):
    """A checkpoint whose saved train-loader state was written with run.seed=0, resumed with run.seed=1."""
    from kd_pipeline.config import DataConfig
    from kd_pipeline.data import build_train_loader, save_loader_state
    from kd_pipeline.tokenizer import load_tokenizer

    loader = build_train_loader(DataConfig(shards=str(synth_data["shards"]), num_workers=0),
                                tokenizer=load_tokenizer(synth_data["tokenizer"]), image_size=56, num_image_tokens=16,
                                micro_batch_size=4, rank=0, world_size=1, seed=0)
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000002"
    save_loader_state(checkpoint, "train", 0, loader.state_dict())
    (checkpoint / "COMPLETE.json").write_text(json.dumps({"tag": checkpoint.name, "step": 2, "files": {}}))
    (checkpoint.parent / "latest").write_text(checkpoint.name)
    argv = train_args(synth_data, tmp_path / "run")
    assert_one_line_error(*run_main(guarded, [*argv, "run.seed=1"], capsys), f"resuming {checkpoint}", "seed 0",
                          "run.seed", only_line=True)
    with pytest.raises(ReachedStartUp):
        guarded([*argv, "run.seed=0"])


def test_the_real_cli_refuses_before_a_geochat_sized_build(synth_data, tmp_path):
    """The unpatched command with GeoChat-13B -> 7B shapes (minutes to construct): a typo in data.shards is one
    line on stderr and exit 2."""
    typo = f"{synth_data['shards']}_typo"
    result = run_cli(["kd_pipeline.train", *train_args(synth_data, tmp_path, f"data.shards={typo}",
                                                       "student.arch=geochat-7b", "teacher.arch=geochat-13b",
                                                       "student.image_size=504", "teacher.image_size=504")])
    assert_one_line_error(result.returncode, result.stderr, f"data.shards={typo}", "does not exist", only_line=True)


@pytest.mark.slow
def test_train_only_shards_train_with_validation_off(synth_data, train_only_shards, tmp_path):
    """train.eval_every=0 really is no validation: a real run on shards without a val split finishes."""
    result = run_cli(["kd_pipeline.train", *train_args(synth_data, tmp_path, f"data.shards={train_only_shards}",
                                                       "train.eval_every=0", "train.max_steps=2",
                                                       "checkpoint.every_steps=2")])
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [1, 2]
    assert not any(key.startswith("val") for record in records for key in record)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000002"


# ----------------------------------------------------------------------------------------------------- other CLIs


def test_eval_run_errors_name_the_file_before_any_model(tmp_path, capsys, monkeypatch):
    from kd_pipeline.eval import generate
    from kd_pipeline.eval.__main__ import main

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the input checks")

    monkeypatch.setattr(generate, "load_eval_model", no_model)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = tmp_path / "bench"
    (data / "images").mkdir(parents=True)
    argv = ["run", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "out"), "--tasks", "aid"]
    assert_one_line_error(*run_main(main, argv, capsys), f"{data / 'aid.jsonl'} does not exist")
    (data / "aid.jsonl").write_text(json.dumps({"question_id": 1, "image": "gone.png", "prompt": "Classify."}) + "\n")
    assert_one_line_error(*run_main(main, argv, capsys), "aid.jsonl", "gone.png", "question 1")


def test_eval_score_error(tmp_path, capsys):
    from kd_pipeline.eval.__main__ import main

    argv = ["score", "--task", "scene", "--answers", str(tmp_path / "none.jsonl")]
    assert_one_line_error(*run_main(main, argv, capsys), "none.jsonl")


def test_export_error(tmp_path, capsys):
    from kd_pipeline.export import main

    argv = ["--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]
    assert_one_line_error(*run_main(main, argv, capsys), f"--checkpoint {tmp_path / 'nowhere'} does not exist")


def test_convert_error(tmp_path, capsys):
    from kd_pipeline.convert import main

    (tmp_path / "GeoChat").mkdir()
    argv = ["geochat-to-hf", "--src", str(tmp_path / "GeoChat"), "--dst", str(tmp_path / "hf")]
    assert_one_line_error(*run_main(main, argv, capsys), str(tmp_path / "GeoChat" / "config.json"), "missing")


def test_plan_config_error(capsys):
    from kd_pipeline.plan import main

    argv = ["--config", str(REPO / "configs" / "tiny_cpu.yaml"), "train.lr=fast"]
    assert_one_line_error(*run_main(main, argv, capsys), "train.lr", only_line=True)


def test_data_prep_shard_on_an_empty_instruction_file(tmp_path, capsys):
    from data_prep.__main__ import main

    (tmp_path / "instruct.json").write_text("[]\n")
    (tmp_path / "images").mkdir()
    argv = ["shard", "--instruct", str(tmp_path / "instruct.json"), "--images", str(tmp_path / "images"), "--out",
            str(tmp_path / "shards")]
    assert_one_line_error(*run_main(main, argv, capsys), str(tmp_path / "instruct.json"), "empty JSON list")
    assert not (tmp_path / "shards" / "manifest.json").exists()


def test_data_prep_verify_manifest_error(tmp_path, capsys):
    from data_prep.__main__ import main

    assert_one_line_error(*run_main(main, ["verify", str(tmp_path)], capsys), "manifest.json")


def test_user_errors_share_one_base_class():
    from data_prep.manifest import ManifestError as PrepManifestError
    from data_prep.sources import InputError
    from kd_pipeline.checkpoint import CheckpointError
    from kd_pipeline.config import ConfigError
    from kd_pipeline.convert import ConversionError
    from kd_pipeline.data.manifest import ManifestError
    from kd_pipeline.data.state import LoaderStateError
    from kd_pipeline.errors import UserError
    from kd_pipeline.eval.generate import EvalImageError
    from kd_pipeline.eval.run import RunInputError
    from kd_pipeline.export import ExportError
    from kd_pipeline.models import ModelError
    from kd_pipeline.tokenizer import TokenizerError

    for error_class in (ConfigError, CheckpointError, ManifestError, ModelError, LoaderStateError, TokenizerError,
                        RunInputError, EvalImageError, ExportError, ConversionError, InputError, PrepManifestError):
        assert issubclass(error_class, UserError), error_class
