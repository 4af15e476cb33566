"""`python -m data_prep synth`: a synthetic remote-sensing world written in real GeoChat formats.

Runbook::

    python -m data_prep synth --out runs/synth --num 2000 --seed 0            # 56 px images, 200 bench questions
    python -m data_prep synth --out runs/synth --num 200 --seed 1 --image-size 112 --bench-num 40 --overwrite

Writes into ``--out``:
  instruct.json         GeoChat_Instruct-style list of {"id", "image", "conversations"}; ``image`` is relative to
                        images/; several records share one image (2-4 each), as in GeoChat's data
  images/               the training images: PNG, every 20th one JPEG (to exercise format sniffing downstream)
  bench/{scene,vqa,referring,region_captioning}.jsonl
                        GeoChat-Bench-format questions over their own images in bench/images/ (all PNG), disjoint
                        from the training images
  pt_corpus.txt         text-only pre-training corpus (stage 2's D_PT): one short scene description per line
  world.json            the world's parameters (classes, object kinds, colours, conventions), seed, sizes, counts

Box text is ``{<x1><y1><x2><y2>|<theta>}`` on the 0-100 grid with the rotation convention documented in
``data_prep.synth_world`` (positive theta = clockwise as seen on the image, y axis down on screen).
Difficulty is graded on purpose: rural/urban and scene class are easy-ish, presence/comparison/counts (up to 6,
small objects included) harder, exact rotated boxes hardest, so a larger model can clearly beat a smaller one.

Deterministic: numpy Generators spawned from one SeedSequence (one stream per output part, so e.g. --bench-num does
not change the training data); the same arguments give byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from data_prep.synth_balanced import (AMBIGUOUS_PAIRS, HEADLINE_WEIGHTS, POSTERIOR_TEMPERATURE, REPRO_VQA_TYPES,
                                     balanced_vqa, headline_record, make_scene)
from data_prep.synth_text import (BENCH_SCENE_PROMPT, GROUP_REFER_PROMPT, VQA_SUFFIX, VQA_TYPES, boxes_text, conversation,
                                  corpus_document, referring_expressions, region_caption, vqa_round)
from data_prep.synth_world import (SCENE_CLASSES, Scene, place_objects, render_scene, size_group_of_area,
                                   world_parameters)

logger = logging.getLogger(__name__)

# Roughly GeoChat_Instruct's mix (Table 2): classification 10%, VQA 20%, referring 8%, region captions 13%,
# grounded/detailed descriptions 25%, multi-round conversations 24%.
RECORD_WEIGHTS = {"scene": 0.10, "vqa": 0.20, "refer": 0.08, "identify": 0.13, "grounding": 0.25, "multi_round": 0.24}
JPEG_EVERY = 20  # every JPEG_EVERY-th training image (index 7, 27, ...) is written as JPEG

# ---- the parts of the world: training set, benchmarks, pre-training corpus ----


def _balanced_classes(rng: np.random.Generator):
    """Scene classes forever, in shuffled blocks that each hold every class once (even class balance)."""
    while True:
        for index in rng.permutation(len(SCENE_CLASSES)):
            yield SCENE_CLASSES[index]


def _save_training_image(scene: Scene, image_dir: Path, image_count: int) -> tuple[str, bool]:
    is_jpeg = image_count % JPEG_EVERY == 7
    file_name = f"{image_count:06d}.{'jpg' if is_jpeg else 'png'}"
    if is_jpeg:
        scene.image.save(image_dir / file_name, format="JPEG", quality=90)
    else:
        scene.image.save(image_dir / file_name, format="PNG")
    return file_name, is_jpeg


def write_headline_training_set(rng: np.random.Generator, out_dir: Path, num_records: int, image_size: int,
                                ambiguous: bool) -> dict:
    """The ``repro`` profile's instruct.json + images/ (one image per record, see ``synth_balanced``)."""
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True)
    record_types = list(HEADLINE_WEIGHTS)
    type_probabilities = np.array(list(HEADLINE_WEIGHTS.values())) / sum(HEADLINE_WEIGHTS.values())
    records, type_counts, jpeg_count, relabelled = [], Counter(), 0, 0
    classes = _balanced_classes(rng)
    for index in tqdm(range(num_records), unit="record", desc="synth train"):
        record_type = str(rng.choice(record_types, p=type_probabilities))
        scene, turns = headline_record(rng, next(classes), image_size, record_type, ambiguous)
        file_name, is_jpeg = _save_training_image(scene, image_dir, index)
        jpeg_count += is_jpeg
        relabelled += record_type == "scene" and scene.label is not scene.scene_class
        records.append({"id": f"synth_{index:06d}", "image": file_name, "conversations": turns})
        type_counts[record_type] += 1
    _write_json(out_dir / "instruct.json", records)
    return {"records": len(records), "images": len(records), "jpeg_images": jpeg_count,
            "record_types": dict(sorted(type_counts.items())), "scene_labels_not_the_dominant_class": relabelled}


def write_training_set(rng: np.random.Generator, out_dir: Path, num_records: int, image_size: int) -> dict:
    """instruct.json + images/; returns counts for world.json."""
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True)
    record_types = list(RECORD_WEIGHTS)
    type_probabilities = np.array(list(RECORD_WEIGHTS.values())) / sum(RECORD_WEIGHTS.values())
    records, type_counts, image_count, jpeg_count = [], Counter(), 0, 0
    classes = _balanced_classes(rng)
    with tqdm(total=num_records, unit="record", desc="synth train") as progress:
        while len(records) < num_records:
            scene = render_scene(rng, next(classes), image_size)
            file_name, is_jpeg = _save_training_image(scene, image_dir, image_count)
            jpeg_count += is_jpeg
            image_count += 1
            # Distinct record types per image: the same question twice on one image would only repeat a record.
            records_here = min(int(rng.integers(2, 5)), num_records - len(records))
            for record_type in rng.choice(record_types, records_here, replace=False, p=type_probabilities):
                record_type = str(record_type)
                turns = conversation(rng, scene, record_type)
                if turns is None:  # no objects to refer to: ask about the scene instead
                    record_type = "vqa"
                    turns = conversation(rng, scene, record_type)
                records.append({"id": f"synth_{len(records):06d}", "image": file_name, "conversations": turns})
                type_counts[record_type] += 1
                progress.update(1)
    _write_json(out_dir / "instruct.json", records)
    return {"records": len(records), "images": image_count, "jpeg_images": jpeg_count,
            "record_types": dict(sorted(type_counts.items()))}


def _save_bench_image(scene: Scene, image_dir: Path, stem: str) -> str:
    """Bench images are always PNG: the referring and region files name them by stem (``image_id + ".png"``)."""
    file_name = f"{stem}.png"
    scene.image.save(image_dir / file_name, format="PNG")
    return file_name


@dataclass(frozen=True)
class Profile:
    """What kind of world: ``geochat`` (GeoChat_Instruct's mix) or ``repro`` (``synth_balanced``), and whether
    the confusable pairs are ambiguous (``repro`` only)."""

    name: str = "geochat"
    ambiguous: bool = False

    def scene(self, rng: np.random.Generator, scene_class, image_size: int) -> Scene:
        if self.name == "repro":
            return make_scene(rng, scene_class, image_size, ambiguous=self.ambiguous)
        return render_scene(rng, scene_class, image_size)


def scene_bench(rng: np.random.Generator, image_dir: Path, bench_num: int, image_size: int,
                profile: Profile = Profile()) -> list[dict]:
    """One classification question per image, classes in balanced blocks; the ground truth is the class that
    shaped the scene (for an ambiguous scene also ``label_posterior``, how sure an annotator would be)."""
    rows, classes = [], _balanced_classes(rng)
    for index in range(bench_num):
        scene = profile.scene(rng, next(classes), image_size)
        file_name = _save_bench_image(scene, image_dir, f"scene_{index:05d}")
        row = {"question_id": f"{scene.scene_class.class_id}/{file_name}", "image": file_name,
               "text": BENCH_SCENE_PROMPT, "ground_truth": scene.scene_class.name}
        if profile.ambiguous:
            row["label_posterior"] = round(scene.posterior, 6)
        rows.append(row)
    return rows


def vqa_bench(rng: np.random.Generator, image_dir: Path, bench_num: int, image_size: int,
              profile: Profile = Profile()) -> list[dict]:
    """The question types equally often, in shuffled order: the four geochat types with two questions per image,
    or LRBEN's three with one image drawn for each question and balanced answers (``repro``)."""
    rows, classes = [], _balanced_classes(rng)
    types = REPRO_VQA_TYPES if profile.name == "repro" else VQA_TYPES
    question_types = [types[index % len(types)] for index in range(bench_num)]
    rng.shuffle(question_types)
    for index, question_type in enumerate(question_types):
        if profile.name == "repro":
            scene, question, answer = balanced_vqa(rng, image_size, question_type, profile.ambiguous)
            file_name = _save_bench_image(scene, image_dir, f"vqa_{index:05d}")
        else:
            if index % 2 == 0:
                scene = render_scene(rng, next(classes), image_size)
                file_name = _save_bench_image(scene, image_dir, f"vqa_{index // 2:05d}")
            question, answer = vqa_round(rng, scene, question_type)
        rows.append({"question_id": index, "image": file_name, "text": f"{question}\n{VQA_SUFFIX}",
                     "ground_truth": answer, "type": question_type})
    return rows


def referring_bench(rng: np.random.Generator, image_dir: Path, bench_num: int, image_size: int,
                    profile: Profile = Profile()) -> list[dict]:
    """Per image one single-object question ("ref") and, 40% of the time, one several-object one ("grounding")."""
    rows, classes, image_index = [], _balanced_classes(rng), 0
    while len(rows) < bench_num:
        scene = profile.scene(rng, next(classes), image_size)
        singles, groups = referring_expressions(scene)
        chosen = [("ref", singles[rng.integers(len(singles))])] if singles else []
        if groups and (not singles or rng.random() < 0.4):
            chosen.append(("grounding", groups[rng.integers(len(groups))]))
        if not chosen:  # nothing to refer to in this scene: draw another
            continue
        image_id = f"ref_{image_index:05d}"
        _save_bench_image(scene, image_dir, image_id)
        image_index += 1
        for question_type, expression in chosen[: bench_num - len(rows)]:
            mean_area = float(np.mean([scene.objects[index].area for index in expression.obj_ids]))
            # GeoChat's evaluation builds "[refer] Give me the location of <p> " + question + " </p>" for `ref`
            # but "[grounding]" + question otherwise (no space, no template): the grounding question carries the
            # rest of the sentence so that the prompt equals the one the training records use.
            question = (expression.phrase if question_type == "ref" else
                        GROUP_REFER_PROMPT.format(phrase=expression.phrase)[len("[grounding]"):])
            rows.append({"question_id": len(rows), "image_id": image_id, "question": question,
                         "type": question_type, "ground_truth": boxes_text(scene, expression.obj_ids),
                         "dataset": "synth", "obj_ids": list(expression.obj_ids),
                         "size_group": size_group_of_area(mean_area)})
    return rows


def region_bench(rng: np.random.Generator, image_dir: Path, bench_num: int, image_size: int,
                 profile: Profile = Profile()) -> list[dict]:
    """Captions of up to two distinct objects per image (``repro``: no size words, the correct place)."""
    rows, classes, image_index = [], _balanced_classes(rng), 0
    repro = profile.name == "repro"
    while len(rows) < bench_num:
        scene = profile.scene(rng, next(classes), image_size)
        if not scene.objects:
            continue
        image_id = f"region_{image_index:05d}"
        _save_bench_image(scene, image_dir, image_id)
        image_index += 1
        for object_index in rng.permutation(len(scene.objects))[: min(2, bench_num - len(rows))]:
            scene_object = scene.objects[object_index]
            caption = region_caption(scene, scene_object, size_words=not repro, annotated=not repro)
            rows.append({"question_id": len(rows), "image_id": image_id, "question": scene_object.box_text,
                         "ground_truth": caption})
    return rows


BENCH_BUILDERS = {"scene": scene_bench, "vqa": vqa_bench, "referring": referring_bench,
                  "region_captioning": region_bench}


def write_benchmarks(rngs: dict[str, np.random.Generator], bench_dir: Path, bench_sizes: dict[str, int],
                     image_size: int, profile: Profile = Profile()) -> dict:
    """bench/<task>.jsonl for the four tasks + their images in bench/images/; returns question counts."""
    image_dir = bench_dir / "images"
    image_dir.mkdir(parents=True)
    counts = {}
    for task, build in tqdm(BENCH_BUILDERS.items(), desc="synth bench", unit="file"):
        rows = build(rngs[task], image_dir, bench_sizes[task], image_size, profile)
        counts[task] = _write_jsonl(bench_dir / f"{task}.jsonl", rows)
    return counts


def write_pt_corpus(rng: np.random.Generator, path: Path, num_lines: int) -> int:
    """pt_corpus.txt: scenes are laid out (objects placed anywhere) but not rendered: only their text is needed."""
    classes = _balanced_classes(rng)
    lines = []
    for _ in range(num_lines):
        scene_class = next(classes)
        lines.append(corpus_document(rng, scene_class, place_objects(rng, scene_class, masks=None)))
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return len(lines)


# ---- files and CLI ----


def _write_json(path: Path, payload) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_jsonl(path: Path, rows: list[dict]) -> int:
    path.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows), encoding="utf-8")
    return len(rows)


OUTPUT_NAMES = ("instruct.json", "images", "bench", "pt_corpus.txt", "world.json")


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    existing = [name for name in OUTPUT_NAMES if (out_dir / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out_dir} already holds synthetic-world output ({', '.join(existing)}); "
                              "pass --overwrite to replace it or choose another --out directory")
    for name in existing:
        target = out_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def parse_bench_sizes(text: str | None, default: int) -> dict[str, int]:
    """``scene=1000,vqa=1000`` -> questions per bench file; tasks not named get ``default``."""
    sizes = dict.fromkeys(BENCH_BUILDERS, default)
    for part in filter(None, (text or "").split(",")):
        task, separator, value = part.partition("=")
        if not separator or task.strip() not in BENCH_BUILDERS or not value.strip().isdigit():
            raise ValueError(f"--bench-sizes {text!r}: expected task=count pairs with tasks from "
                             f"{', '.join(BENCH_BUILDERS)}, e.g. scene=1000,vqa=1000")
        sizes[task.strip()] = int(value)
    return sizes


def generate_world(out_dir: Path, num_records: int, seed: int, image_size: int = 56, bench_num: int | None = None,
                   pt_lines: int = 300, overwrite: bool = False, profile: Profile = Profile(),
                   bench_sizes: dict[str, int] | None = None) -> dict:
    """Write the whole synthetic world into ``out_dir``; returns the contents of world.json.

    ``bench_sizes`` (questions per bench file) overrides ``bench_num`` per task."""
    if image_size < 16:
        raise ValueError(f"--image-size {image_size} is too small: use at least 16 pixels")
    if num_records < 1:
        raise ValueError(f"--num {num_records}: ask for at least one training record")
    if profile.name not in PROFILES:
        raise ValueError(f"--profile {profile.name!r}: choose one of {', '.join(PROFILES)}")
    if profile.ambiguous and profile.name != "repro":
        raise ValueError("--ambiguous needs --profile repro (the geochat profile has no ambiguous labels)")
    bench_num = max(1, num_records // 10) if bench_num is None else bench_num
    bench_sizes = {**dict.fromkeys(BENCH_BUILDERS, bench_num), **(bench_sizes or {})}
    if min(bench_sizes.values()) < 0 or pt_lines < 0:
        raise ValueError(f"bench sizes {bench_sizes} and --pt-lines {pt_lines} must not be negative")
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, overwrite)
    # One independent stream per part, in a fixed order: changing one part's size leaves the others unchanged.
    train_rng, corpus_rng, *bench_rngs = (np.random.default_rng(child)
                                          for child in np.random.SeedSequence(seed).spawn(2 + len(BENCH_BUILDERS)))
    world = {"seed": seed, "image_size": image_size, "num_records": num_records, "bench_num": bench_num,
             "bench_sizes": bench_sizes, "pt_lines": pt_lines, "profile": profile.name,
             "ambiguous": profile.ambiguous, **world_parameters()}
    if profile.name == "repro":
        world["repro_profile"] = {"record_weights": HEADLINE_WEIGHTS, "ambiguous_pairs": AMBIGUOUS_PAIRS,
                                  "posterior_temperature": POSTERIOR_TEMPERATURE}
        world["train"] = write_headline_training_set(train_rng, out_dir, num_records, image_size, profile.ambiguous)
    else:
        world["train"] = write_training_set(train_rng, out_dir, num_records, image_size)
    world["bench"] = write_benchmarks(dict(zip(BENCH_BUILDERS, bench_rngs)), out_dir / "bench", bench_sizes,
                                      image_size, profile)
    world["pt_corpus_lines"] = write_pt_corpus(corpus_rng, out_dir / "pt_corpus.txt", pt_lines)
    _write_json(out_dir / "world.json", world)
    logger.info("synthetic world written to %s", out_dir)
    return world


PROFILES = ("geochat", "repro")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep synth",
                                     description="Write a synthetic remote-sensing world in real GeoChat formats.")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--num", type=int, default=2000, help="number of training records (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    parser.add_argument("--image-size", type=int, default=56, help="square image side in pixels, >= 16 (default 56)")
    parser.add_argument("--bench-num", type=int, default=None, help="questions per bench file (default num // 10)")
    parser.add_argument("--bench-sizes", default=None,
                        help="per-task bench sizes overriding --bench-num, e.g. scene=1000,vqa=1000,region_captioning=500")
    parser.add_argument("--pt-lines", type=int, default=300, help="lines of pt_corpus.txt (default 300)")
    parser.add_argument("--profile", choices=PROFILES, default="geochat",
                        help="geochat: GeoChat_Instruct's task mix (default); repro: headline tasks whose answers "
                             "depend on the image (data_prep/synth_balanced.py)")
    parser.add_argument("--ambiguous", action="store_true",
                        help="repro profile: confusable class pairs get labels drawn from a posterior")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier synthetic world in --out")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    options = parser.parse_args(argv)
    try:
        world = generate_world(options.out, options.num, options.seed, options.image_size, options.bench_num,
                               options.pt_lines, options.overwrite, Profile(options.profile, options.ambiguous),
                               parse_bench_sizes(options.bench_sizes, options.bench_num or max(1, options.num // 10)))
    except (ValueError, FileExistsError) as error:
        parser.error(str(error))
    train = world["train"]
    print(f"synthetic world in {options.out}: {train['records']} records on {train['images']} images "
          f"({train['jpeg_images']} JPEG), bench {world['bench']}, {world['pt_corpus_lines']} corpus lines")
    for record_type, count in train["record_types"].items():
        print(f"  {record_type:<12} {count}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
