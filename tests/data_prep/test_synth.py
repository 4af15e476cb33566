"""Tests of `data_prep synth`: determinism, GeoChat format rules, bench files, drawn boxes, learnability."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import synth
from data_prep.synth_world import SceneObject, draw_objects
from data_prep.synth_world import box_corners as world_box_corners

# Strict box grammar of the brief, written independently of the generator.
BOX = re.compile(r"\{<(\d{1,3})><(\d{1,3})><(\d{1,3})><(\d{1,3})>\|<(-?\d{1,2})>\}")
VQA_SUFFIX = "Answer the question using a single word or phrase."
KIND_PLURALS = {"plane": "planes", "ship": "ships", "vehicle": "vehicles", "storage tank": "storage tanks",
                "building": "buildings"}


def run_synth(out_dir: Path, *extra: str) -> Path:
    assert synth.main(["--out", str(out_dir), *extra]) == 0
    return out_dir


def parse_boxes(text: str) -> list[tuple[int, int, int, int, int]]:
    """All boxes in ``text``; fails if any '{<' starts something that is not a well-formed box on the grid."""
    boxes = [tuple(int(value) for value in match) for match in BOX.findall(text)]
    assert len(boxes) == text.count("{<"), f"malformed box text in {text!r}"
    for x1, y1, x2, y2, angle in boxes:
        assert 0 <= x1 < x2 <= 100 and 0 <= y1 < y2 <= 100, (x1, y1, x2, y2)
        assert -90 <= angle <= 90, angle
    return boxes


def files_of(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory) -> Path:
    return run_synth(tmp_path_factory.mktemp("world"), "--num", "400", "--seed", "3", "--bench-num", "200",
                     "--pt-lines", "80")


@pytest.fixture(scope="module")
def records(world_dir) -> list[dict]:
    return json.loads((world_dir / "instruct.json").read_text())


@pytest.fixture(scope="module")
def world(world_dir) -> dict:
    return json.loads((world_dir / "world.json").read_text())


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path):
    small = ("--num", "40", "--bench-num", "8", "--pt-lines", "10")
    first = files_of(run_synth(tmp_path / "a", "--seed", "5", *small))
    second = files_of(run_synth(tmp_path / "b", "--seed", "5", *small))
    other = files_of(run_synth(tmp_path / "c", "--seed", "6", *small))
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []
    assert first["instruct.json"] != other["instruct.json"]
    assert first["pt_corpus.txt"] != other["pt_corpus.txt"]
    assert first["images/000000.png"] != other["images/000000.png"]


def test_records_follow_geochat_format(world_dir, records):
    assert len(records) == 400
    assert len({record["id"] for record in records}) == len(records)
    for record in records:
        assert set(record) == {"id", "image", "conversations"}
        assert (world_dir / "images" / record["image"]).is_file()
        turns = record["conversations"]
        assert len(turns) >= 2 and len(turns) % 2 == 0
        assert [turn["from"] for turn in turns] == ["human", "gpt"] * (len(turns) // 2)
        first = turns[0]["value"]
        assert first.count("<image>") == 1
        assert first.startswith("<image>\n") or first.endswith("\n<image>")
        assert all("<image>" not in turn["value"] for turn in turns[1:])
        for turn in turns:
            assert turn["value"].strip() == turn["value"] and turn["value"]
            parse_boxes(turn["value"])


def test_records_cover_every_task_and_share_images(records):
    humans = [turn["value"] for record in records for turn in record["conversations"] if turn["from"] == "human"]
    assert sum("Classify the" in text or "scene classes" in text for text in humans) > 20
    assert sum(text.replace("\n<image>", "").endswith(VQA_SUFFIX) for text in humans) > 40
    assert sum("[refer] Give me the location of <p> " in text for text in humans) > 10
    assert sum("[identify] What is the object present at {<" in text for text in humans) > 20
    assert sum("[grounding] Describe the image in detail" in text for text in humans) > 40
    assert sum(len(record["conversations"]) >= 4 for record in records) > 30
    assert sum(text.startswith("<image>\n") for text in humans) > 50
    assert sum(text.endswith("\n<image>") for text in humans) > 50
    per_image = Counter(record["image"] for record in records)
    assert max(per_image.values()) <= 4 and len(per_image) <= len(records) / 2


def test_answers_agree_with_grounded_descriptions(records):
    """Counts and presence answers on an image match the boxes its grounded description lists per kind."""
    counts_by_image: dict[str, Counter] = {}
    for record in records:
        for question, answer in zip(record["conversations"][::2], record["conversations"][1::2]):
            if "[grounding] Describe the image in detail" in question["value"]:
                counts = Counter()
                for phrase, boxes in re.findall(r"<p>([^<]+)</p> ((?:\{[^}]+\})+)", answer["value"]):
                    kind = next(name for name, plural in KIND_PLURALS.items()
                                if phrase.endswith(" " + name) or phrase.endswith(" " + plural))
                    counts[kind] = len(parse_boxes(boxes))
                counts_by_image[record["image"]] = counts
    checked = 0
    for record in records:
        counts = counts_by_image.get(record["image"])
        for question, answer in zip(record["conversations"][::2], record["conversations"][1::2]):
            text = question["value"].replace("<image>", "").strip()
            how_many = re.match(r"(?:How many|What is the number of) ([a-z ]+?) (?:are there|can be seen|in the)", text)
            presence = re.match(r"(?:Is there a|Are there any|Is a) ([a-z ]+?) (?:in the|in this|present)", text)
            if counts is None or not (how_many or presence):
                continue
            noun = (how_many or presence).group(1)
            kind = next(name for name, plural in KIND_PLURALS.items() if noun in (name, plural))
            expected = str(counts[kind]) if how_many else ("Yes" if counts[kind] else "No")
            assert answer["value"] == expected, (record["id"], text)
            checked += 1
    assert checked > 10


def test_images_are_png_with_a_few_jpeg(world_dir, world):
    formats = Counter()
    for path in (world_dir / "images").iterdir():
        with Image.open(path) as image:
            formats[image.format] += 1
            assert image.size == (56, 56) and image.mode == "RGB"
            assert path.suffix == {"PNG": ".png", "JPEG": ".jpg"}[image.format]
    assert formats["JPEG"] == world["train"]["jpeg_images"] >= 3
    assert formats["PNG"] > 10 * formats["JPEG"]
    assert sum(formats.values()) == world["train"]["images"]


def test_scene_classes_are_balanced(world_dir, records):
    scene_rows = read_jsonl(world_dir / "bench" / "scene.jsonl")
    bench_counts = Counter(row["ground_truth"] for row in scene_rows)
    assert len(bench_counts) >= 8
    assert max(bench_counts.values()) - min(bench_counts.values()) <= 1
    train_answers = Counter(record["conversations"][1]["value"] for record in records
                            if "Classify the" in record["conversations"][0]["value"]
                            or "scene classes" in record["conversations"][0]["value"])
    assert set(train_answers) == set(bench_counts)
    mean_count = sum(train_answers.values()) / len(train_answers)
    assert min(train_answers.values()) > 0.4 * mean_count and max(train_answers.values()) < 1.8 * mean_count


def test_bench_files_have_geochat_fields(world_dir, world):
    bench = world_dir / "bench"
    class_names = [scene_class["name"] for scene_class in world["classes"]]
    class_ids = {scene_class["name"]: scene_class["class_id"] for scene_class in world["classes"]}
    scene_rows = read_jsonl(bench / "scene.jsonl")
    assert len(scene_rows) == 200
    for row in scene_rows:
        assert set(row) == {"question_id", "image", "text", "ground_truth"}
        assert row["question_id"] == f"{class_ids[row['ground_truth']]}/{row['image']}"
        assert " " not in row["question_id"] and (bench / "images" / row["image"]).is_file()
        # GeoChat's scene scorer: answer without spaces/periods, lowercased == class name from question_id.
        assert row["question_id"].split("/")[0].lower() == row["ground_truth"].replace(" ", "").lower()
        assert row["text"] == ("Classify the given image in one of the following classes. Classes: "
                               + ", ".join(class_names) + " \nAnswer in one word or a short phrase.")
    vqa_rows = read_jsonl(bench / "vqa.jsonl")
    assert Counter(row["type"] for row in vqa_rows) == {kind: 50 for kind in ("presence", "comparison",
                                                                                "rural_urban", "count")}
    for row in vqa_rows:
        assert set(row) == {"question_id", "image", "text", "ground_truth", "type"}
        assert row["text"].endswith("\n" + VQA_SUFFIX) and (bench / "images" / row["image"]).is_file()
        allowed = {"presence": {"Yes", "No"}, "comparison": {"Yes", "No"}, "rural_urban": {"rural", "urban"},
                   "count": {str(count) for count in range(10)}}[row["type"]]
        assert row["ground_truth"] in allowed
    referring_rows = read_jsonl(bench / "referring.jsonl")
    assert {row["type"] for row in referring_rows} == {"ref", "grounding"}
    for row in referring_rows:
        assert set(row) == {"question_id", "image_id", "question", "type", "ground_truth", "dataset", "obj_ids",
                            "size_group"}
        assert (bench / "images" / f"{row['image_id']}.png").is_file() and row["dataset"] == "synth"
        boxes = parse_boxes(row["ground_truth"])
        assert len(boxes) == len(row["obj_ids"]) and (len(boxes) == 1) == (row["type"] == "ref")
        assert row["size_group"] in {"small", "medium", "large"}
        assert row["question"].startswith("the ") if row["type"] == "ref" else \
            row["question"].startswith((" Give me the location of <p> all the ", " Give me the location of <p> the "))
    region_rows = read_jsonl(bench / "region_captioning.jsonl")
    assert len(region_rows) == 200
    for row in region_rows:
        assert set(row) == {"question_id", "image_id", "question", "ground_truth"}
        assert len(parse_boxes(row["question"])) == 1 and row["question"] == BOX.fullmatch(row["question"]).group(0)
        assert row["ground_truth"].startswith(("a ", "an ")) and (bench / "images" / f"{row['image_id']}.png").is_file()
    assert world["bench"] == {"scene": 200, "vqa": 200, "referring": 200, "region_captioning": 200}


def test_bench_images_are_disjoint_from_training_images(world_dir):
    def digests(folder: Path) -> set[str]:
        return {hashlib.sha256(path.read_bytes()).hexdigest() for path in folder.iterdir() if path.is_file()}

    assert not digests(world_dir / "images") & digests(world_dir / "bench" / "images")


def _pixel_at_box_centre(image: np.ndarray, box) -> tuple[int, ...]:
    x1, y1, x2, y2, _ = box
    size = image.shape[0]
    return tuple(int(value) for value in image[int((y1 + y2) / 2 * size / 100), int((x1 + x2) / 2 * size / 100)])


def test_boxes_cover_the_drawn_objects(world_dir, world):
    """The pixel at a box centre shows the object's colour (objects at least 8 grid units wide)."""
    colours = {name: tuple(rgb) for name, rgb in world["colours"].items()}
    images = {}

    def image_of(image_id: str) -> np.ndarray:
        if image_id not in images:
            images[image_id] = np.asarray(Image.open(world_dir / "bench" / "images" / f"{image_id}.png"))
        return images[image_id]

    checked_captions = 0
    for row in read_jsonl(world_dir / "bench" / "region_captioning.jsonl"):
        box = parse_boxes(row["question"])[0]
        if min(box[2] - box[0], box[3] - box[1]) < 8:
            continue
        colour = next(name for name in colours if f" {name} " in f" {row['ground_truth']} ")
        assert _pixel_at_box_centre(image_of(row["image_id"]), box) == colours[colour], row
        checked_captions += 1
    checked_references = 0
    for row in read_jsonl(world_dir / "bench" / "referring.jsonl"):
        named_colour = next((name for name in colours if f" {name} " in f" {row['question']} "), None)
        for box in parse_boxes(row["ground_truth"]):
            if min(box[2] - box[0], box[3] - box[1]) < 8:
                continue
            pixel = _pixel_at_box_centre(image_of(row["image_id"]), box)
            assert pixel in colours.values(), row
            if named_colour:
                assert pixel == colours[named_colour], row
            checked_references += 1
    assert checked_captions > 30 and checked_references > 30


def test_rotation_is_clockwise_on_screen():
    """theta = +45: the ship's bow half points down-right on the image (y down), not up-right."""
    background = np.full((100, 100, 3), 90, dtype=np.uint8)
    ship = SceneObject("ship", "red", 20, 46, 80, 54, 45)  # length 60 along x before rotation, centred at (50, 50)
    image = np.asarray(draw_objects(background, [ship]))
    offset = 20 / math.sqrt(2)
    up_right = image[round(50 - offset), round(50 + offset)]
    down_right = image[round(50 + offset), round(50 + offset)]
    assert tuple(down_right) == (205, 40, 40) and tuple(up_right) == (90, 90, 90)
    assert parse_boxes(ship.box_text) == [(20, 46, 80, 54, 45)]


def test_colour_histogram_baseline_is_above_chance_but_not_perfect(world_dir):
    """Nearest class mean on 4x4x4 colour histograms: train on half the scene bench, test on the other half."""
    rows = read_jsonl(world_dir / "bench" / "scene.jsonl")

    def histogram(file_name: str) -> np.ndarray:
        pixels = np.asarray(Image.open(world_dir / "bench" / "images" / file_name)) // 64  # (S, S, 3) in 0..3
        counts = np.bincount((pixels[..., 0] * 16 + pixels[..., 1] * 4 + pixels[..., 2]).ravel(), minlength=64)
        return counts / counts.sum()

    features = np.stack([histogram(row["image"]) for row in rows])  # (M, 64)
    labels = np.array([row["ground_truth"] for row in rows])
    train, test = np.arange(len(rows)) % 2 == 0, np.arange(len(rows)) % 2 == 1
    classes = sorted(set(labels))
    class_means = np.stack([features[train & (labels == name)].mean(0) for name in classes])  # (C, 64)
    distances = ((features[test][:, None, :] - class_means[None]) ** 2).sum(-1)  # (M/2, C)
    accuracy = float((np.array(classes)[distances.argmin(1)] == labels[test]).mean())
    chance = 1 / len(classes)
    assert 2.5 * chance < accuracy < 0.9, accuracy


def test_pt_corpus_is_plain_text_about_the_scenes(world_dir, world):
    lines = (world_dir / "pt_corpus.txt").read_text().splitlines()
    assert len(lines) == 80 == world["pt_corpus_lines"]
    class_names = [scene_class["name"] for scene_class in world["classes"]]
    for line in lines:
        assert line.strip() == line and line.endswith(".")
        assert "<image>" not in line and "{<" not in line and "<p>" not in line
        assert any(name in line for name in class_names)
    assert len(set(lines)) > 0.9 * len(lines)


def test_world_json_records_parameters_and_counts(world_dir, world, records):
    assert world["seed"] == 3 and world["image_size"] == 56 and world["num_records"] == 400
    assert len(world["classes"]) >= 8
    assert {kind["name"] for kind in world["object_kinds"]} == set(KIND_PLURALS)
    assert "clockwise" in world["rotation_convention"] and "counter" not in world["rotation_convention"]
    assert world["train"]["images"] == len({record["image"] for record in records})
    assert sum(world["train"]["record_types"].values()) == len(records)


def test_synth_boxes_agree_with_the_scorer_geometry():
    """The world that draws the objects and the scorer that grades boxes share one rotation convention."""
    from kd_pipeline.eval.boxes import box_polygon, parse_boxes as scorer_parse

    for angle in (-60, -5, 0, 30, 90):
        ship = SceneObject("ship", "red", 20, 40, 70, 52, angle)
        corners = world_box_corners(20, 40, 70, 52, angle)  # grid units
        polygon = box_polygon(scorer_parse(ship.box_text)[0], width=100, height=100)
        assert polygon.equals_exact(type(polygon)(corners), 1e-6) or \
            polygon.symmetric_difference(type(polygon)(corners)).area < 1e-6, angle


def test_cli_refuses_bad_input_and_overwrites_only_when_asked(tmp_path, capsys):
    with pytest.raises(SystemExit) as too_small:
        synth.main(["--out", str(tmp_path / "tiny"), "--image-size", "8"])
    assert too_small.value.code == 2 and "--image-size" in capsys.readouterr().err
    out_dir = run_synth(tmp_path / "world", "--num", "30", "--bench-num", "4", "--pt-lines", "3")
    with pytest.raises(SystemExit):
        synth.main(["--out", str(out_dir), "--num", "6", "--bench-num", "2"])
    assert "--overwrite" in capsys.readouterr().err
    run_synth(out_dir, "--num", "6", "--bench-num", "2", "--pt-lines", "3", "--overwrite", "--image-size", "32")
    world = json.loads((out_dir / "world.json").read_text())
    assert len(list((out_dir / "images").iterdir())) == world["train"]["images"] <= 3
    assert len(json.loads((out_dir / "instruct.json").read_text())) == 6
    with Image.open(next((out_dir / "bench" / "images").iterdir())) as image:
        assert image.size == (32, 32)


def test_bench_grounding_prompts_are_prompts_the_training_data_uses(world_dir):
    """data_prep bench builds GeoChat's prompts ("[refer] Give me the location of <p> q </p>", "[grounding]" + q):
    every one of them must be a prompt the synthetic training records teach."""
    from data_prep.bench import build_prompt

    def template(text: str) -> str:  # the prompt with its phrase abstracted
        return re.sub(r"<p> .+? </p>", "<p> X </p>", text.replace("<image>", "").strip())

    training_templates = {template(turn["value"]) for record in json.loads((world_dir / "instruct.json").read_text())
                          for turn in record["conversations"] if turn["from"] == "human"}
    types = set()
    for line in (world_dir / "bench" / "referring.jsonl").read_text().splitlines():
        question = json.loads(line)
        types.add(question["type"])
        assert template(build_prompt("referring", question)) in training_templates, build_prompt("referring", question)
    assert types == {"ref", "grounding"}
