"""`python -m kd_pipeline.eval score ...` on small answer files, GeoChat's field names included."""

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
from PIL import Image

from kd_pipeline.eval import __main__ as cli
from kd_pipeline.eval.__main__ import main


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def run_json(argv, capsys) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_scene_answers_from_geochat_script(tmp_path, capsys):
    answers = write_jsonl(tmp_path / "aid.jsonl", [
        {"question_id": "Forest/forest_1.jpg", "image_id": "forest_1.jpg", "answer": "Forest", "ground_truth": "Forest"},
        {"question_id": "Forest/forest_2.jpg", "image_id": "forest_2.jpg", "answer": "Desert.", "ground_truth": "Forest"},
        {"question_id": "Desert/desert_1.jpg", "image_id": "desert_1.jpg", "answer": "desert", "ground_truth": "Desert"},
    ])
    metrics = run_json(["score", "--task", "scene", "--answers", str(answers)], capsys)
    assert metrics["oa"] == pytest.approx(2 / 3) and metrics["aa"] == pytest.approx(0.75)
    assert metrics["confusion"]["matrix"] == [[1, 0, 0], [1, 1, 0]]
    assert (metrics["n"], metrics["unparsable"]) == (3, 0)


def test_vqa_answers_joined_with_questions(tmp_path, capsys):
    answers = write_jsonl(tmp_path / "answers.jsonl", [
        {"question_id": 10, "image_id": "1.png", "answer": "Yes"},
        {"question_id": 11, "image_id": "1.png", "answer": "no"},
        {"question_id": 12, "image_id": "2.png", "answer": "rural"},
    ])
    questions = write_jsonl(tmp_path / "lrben.jsonl", [
        {"question_id": 10, "image": "1.png", "text": "Is there a road?", "ground_truth": "yes", "category": "presence"},
        {"question_id": 11, "image": "1.png", "text": "More roads than buildings?", "ground_truth": "yes", "category": "comp"},
        {"question_id": 12, "image": "2.png", "text": "Rural or urban?", "ground_truth": "rural", "category": "rural_urban"},
    ])
    metrics = run_json(["score", "--task", "vqa", "--answers", str(answers), "--questions", str(questions)], capsys)
    assert metrics["accuracy_by_type"] == {"comparison": 0.0, "presence": 1.0, "rural_urban": 1.0}
    assert metrics["moa"] == pytest.approx(2 / 3)


def test_referring_reads_image_sizes_from_the_image_folder(tmp_path, capsys):
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    Image.new("RGB", (400, 200)).save(image_dir / "tile_1.png")
    # Pixel box (80, 40)-(160, 120) in a 400 x 200 image = grid (20, 20)-(40, 60).
    answers = write_jsonl(tmp_path / "referring.jsonl", [{
        "question_id": "q1", "image_id": "tile_1", "answer": "{<20><20><40><60>|<0>}", "question": "the plane",
        "ground_truth": [[[80, 40], [160, 40], [160, 120], [80, 120]]], "type": "ref", "dataset": "FAST",
        "obj_ids": [1], "size_group": "small"}])
    metrics = run_json(["score", "--task", "referring", "--answers", str(answers), "--image-dir", str(image_dir)], capsys)
    assert metrics["acc@0.5"] == 1.0 and metrics["by_size_group"]["small"]["n"] == 1

    assert main(["score", "--task", "referring", "--answers", str(answers)]) == 2
    assert "--image-dir" in capsys.readouterr().err


def test_region_captioning_table_output(tmp_path, capsys):
    answers = write_jsonl(tmp_path / "region.jsonl", [
        {"question_id": 1, "answer": "<p>a white plane</p>", "ground_truth": "a white plane"}])
    assert main(["score", "--task", "region_captioning", "--answers", str(answers), "--no-meteor"]) == 0
    table = capsys.readouterr().out
    assert "rouge1" in table and "1.0000  (100.00%)" in table and "METEOR switched off" in table


def test_bad_input_gives_a_clear_message(tmp_path, capsys):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question_id": 1, "answer": "x"}\n{not json\n', encoding="utf-8")
    assert main(["score", "--task", "scene", "--answers", str(broken)]) == 2
    assert f"{broken}:2 is not valid JSON" in capsys.readouterr().err
    assert main(["score", "--task", "scene", "--answers", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_run_subcommand_passes_its_arguments_through(monkeypatch):
    received = []
    fake_module = types.ModuleType("fake_run")
    fake_module.main = lambda argv: received.append(argv) or 0
    monkeypatch.setitem(sys.modules, "fake_run", fake_module)
    monkeypatch.setattr(cli, "RUN_MODULE", "fake_run")
    assert main(["run", "--model", "x", "--tasks", "aid"]) == 0
    assert received == [["--model", "x", "--tasks", "aid"]]


def test_module_entry_point_prints_one_json_object(tmp_path):
    answers = write_jsonl(tmp_path / "ucm.jsonl", [{"question_id": "Beach/b1.tif", "answer": "beach"}])
    completed = subprocess.run(
        [sys.executable, "-m", "kd_pipeline.eval", "score", "--task", "scene", "--answers", str(answers), "--json"],
        capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[2])
    assert json.loads(completed.stdout)["oa"] == 1.0
