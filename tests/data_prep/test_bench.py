"""``python -m data_prep bench``: each GeoChat-Bench task file -> the normalized evaluation set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.data_prep.conftest import write_image
from data_prep import bench


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def run_bench(task: str, questions: Path, images: Path, out: Path, *extra: str) -> tuple[list[dict], list[dict]]:
    exit_code = bench.main(["--task", task, "--questions", str(questions), "--images", str(images),
                            "--out", str(out), "--max-reject-fraction", "1", *extra])
    assert exit_code == 0
    normalized = [json.loads(line) for line in (out / f"{task}.jsonl").read_text().splitlines()]
    rejects = [json.loads(line) for line in (out / f"{task}.rejects.jsonl").read_text().splitlines()]
    manifest = json.loads((out / f"{task}.manifest.json").read_text())
    assert manifest["totals"] == {"input": manifest["totals"]["input"], "written": len(normalized),
                                  "rejected": len(rejects)}
    assert manifest["totals"]["input"] == len(normalized) + len(rejects)
    for question in normalized:
        assert set(question) == {"question_id", "task", "image", "image_width", "image_height", "prompt",
                                 "ground_truth", "class", "type", "size_group", "dataset", "obj_ids"}
        assert (out / "images" / question["image"]).is_file()
    return normalized, rejects


@pytest.mark.parametrize("task", ["aid", "ucmerced"])
def test_scene_classification(tmp_path, task):
    images = tmp_path / "images"
    airport = write_image(images / "Airport/airport_1.jpg", size=(30, 20), image_format="JPEG")
    write_image(images / "Beach/beach_3.tif", image_format="TIFF")
    prompt = "Classify the image within one of the given classes: Airport, Beach. Answer with one word or phrase."
    questions = write_jsonl(tmp_path / f"{task}.jsonl", [
        {"question_id": "Airport/airport_1", "image": "Airport/airport_1.jpg", "text": prompt,
         "ground_truth": "Airport"},
        {"question_id": "Beach/beach_3", "image": "Beach/beach_3.png", "text": prompt, "ground_truth": "Beach"},
        {"question_id": "no_class_prefix", "image": "Airport/airport_1.jpg", "text": prompt, "ground_truth": "x"},
        {"question_id": "Beach/gone", "image": "Beach/gone.png", "text": prompt, "ground_truth": "Beach"},
        {"question_id": "Airport/airport_1", "image": "Airport/airport_1.jpg", "text": prompt,
         "ground_truth": "Airport"},
    ])
    normalized, rejects = run_bench(task, questions, images, tmp_path / "eval")
    assert normalized[0] == {
        "question_id": "Airport/airport_1", "task": task, "image": f"{task}/Airport/airport_1.jpg",
        "image_width": 30, "image_height": 20, "prompt": prompt, "ground_truth": "Airport", "class": "Airport",
        "type": None, "size_group": None, "dataset": None, "obj_ids": None}
    # the .png name resolves to the only same-stem file, a .tif
    assert normalized[1]["image"] == f"{task}/Beach/beach_3.tif" and normalized[1]["class"] == "Beach"
    assert (tmp_path / "eval/images" / normalized[0]["image"]).read_bytes() == airport
    assert [(reject["index"], reject["reason"]) for reject in rejects] == [
        (2, "malformed_record"), (3, "missing_image"), (4, "duplicate_id")]


@pytest.mark.parametrize("task", ["lrben", "hrben"])
def test_vqa_with_answers_inline_or_from_the_rsvqa_file(tmp_path, task):
    images = tmp_path / "images"
    write_image(images / "0.tif", image_format="TIFF")
    write_image(images / "1.tif", image_format="TIFF", seed=1)
    suffix = " Answer the question using a single word or phrase."
    questions = write_jsonl(tmp_path / f"{task}.jsonl", [
        {"question_id": 10, "image": "0.tif", "text": "Is there a road?" + suffix, "category": "presence"},
        {"question_id": 11, "image": "1.tif", "text": "Are there more roads than houses?" + suffix,
         "type": "comparison", "ground_truth": "no"},
        {"question_id": 12, "image": "1.tif", "text": "Is it urban?" + suffix, "category": "rural_urban"},
        {"question_id": 13, "image": "0.tif", "text": "How many?" + suffix},
        "{not json",
    ])
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps({"answers": [{"id": 0, "question_id": 10, "answer": "yes"},
                                               {"id": 1, "question_id": 13, "answer": "4"}]}))
    normalized, rejects = run_bench(task, questions, images, tmp_path / "eval", "--answers", str(answers))
    assert [(row["question_id"], row["ground_truth"], row["type"]) for row in normalized] == [
        (10, "yes", "presence"), (11, "no", "comparison")]
    assert normalized[0]["prompt"] == "Is there a road?" + suffix
    assert [(reject["index"], reject["reason"]) for reject in rejects] == [
        (2, "missing_ground_truth"), (3, "malformed_record"), (4, "malformed_record")]


def test_referring_prompts_follow_geochat(tmp_path):
    images = tmp_path / "images"
    write_image(images / "P0001.png", size=(50, 40))
    write_image(images / "P0002.jpg", image_format="JPEG")
    questions = write_jsonl(tmp_path / "referring.jsonl", [
        {"question_id": 0, "image_id": "P0001", "question": "the small white car", "type": "ref",
         "ground_truth": [[1, 2, 3, 4, 5, 6, 7, 8]], "dataset": "DOTA", "obj_ids": [3], "size_group": "small"},
        {"question_id": 1, "image_id": "P0002.jpg", "question": " all planes", "type": "grounding",
         "ground_truth": [[0, 0, 10, 0, 10, 10, 0, 10]], "dataset": "DIOR", "obj_ids": [1, 2],
         "size_group": "large"},
        {"question_id": 2, "image_id": "P0001", "question": "x", "ground_truth": [[1, 2]]},
    ])
    normalized, rejects = run_bench("referring", questions, images, tmp_path / "eval")
    assert normalized[0]["prompt"] == "[refer] Give me the location of <p> the small white car </p>"
    assert normalized[1]["prompt"] == "[grounding] all planes"
    assert (normalized[0]["image"], normalized[0]["image_width"], normalized[0]["image_height"]) == (
        "referring/P0001.png", 50, 40)
    assert normalized[1]["image"] == "referring/P0002.jpg"
    assert (normalized[0]["type"], normalized[0]["dataset"], normalized[0]["obj_ids"], normalized[0]["size_group"]) \
        == ("ref", "DOTA", [3], "small")
    assert normalized[1]["ground_truth"] == [[0, 0, 10, 0, 10, 10, 0, 10]]
    assert [(reject["index"], reject["reason"]) for reject in rejects] == [(2, "malformed_record")]


def test_region_captioning_checks_box_text(tmp_path):
    images = tmp_path / "images"
    write_image(images / "1234.png")
    questions = write_jsonl(tmp_path / "region_captioning.jsonl", [
        {"question_id": "a", "image_id": "1234", "question": "{<8><26><22><37>}", "ground_truth": "a ship"},
        {"question_id": "b", "image_id": 1234, "question": "{<8><26><22><137>}", "ground_truth": "a ship"},
        {"question_id": "c", "image_id": "1234", "question": "somewhere", "ground_truth": "a ship"},
        {"image_id": "1234", "question": "{<1><2><3><4>|<30>}", "ground_truth": "<p>a tank</p>"},
        {"question_id": "e", "image_id": "1234", "question": "{<1><2><3><4>}", "ground_truth": ""},
    ])
    normalized, rejects = run_bench("region_captioning", questions, images, tmp_path / "eval")
    assert normalized[0]["prompt"] == "[identify] What is the object present at {<8><26><22><37>}"
    assert normalized[1]["question_id"] == 3 and normalized[1]["ground_truth"] == "<p>a tank</p>"
    assert [(reject["index"], reject["reason"]) for reject in rejects] == [
        (1, "bad_box"), (2, "bad_box"), (4, "missing_ground_truth")]
    manifest = json.loads((tmp_path / "eval/region_captioning.manifest.json").read_text())
    assert manifest["images"]["count"] == 1 and manifest["kind"] == "eval"


def test_unusable_question_file_and_reject_fraction(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    assert bench.main(["--task", "aid", "--questions", str(tmp_path / "absent.jsonl"), "--images", str(images),
                       "--out", str(tmp_path / "eval")]) == 2
    assert "absent.jsonl" in capsys.readouterr().err
    questions = write_jsonl(tmp_path / "aid.jsonl", [
        {"question_id": "A/1", "image": "missing.png", "text": "q", "ground_truth": "A"}])
    assert bench.main(["--task", "aid", "--questions", str(questions), "--images", str(images),
                       "--out", str(tmp_path / "eval")]) == 1
    assert "aid.rejects.jsonl" in capsys.readouterr().err
