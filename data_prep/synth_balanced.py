"""The ``repro`` profile of the synthetic world: headline tasks whose answers depend on the image.

Why a second profile: in the ``geochat`` profile (GeoChat_Instruct's task mix) the question text alone answered the
VQA as well as the trained models (question-only mOA 55 vs teacher 54), a lookup from the box text alone beat the
teacher on region captions, and 71 % of the supervised tokens were grounded descriptions (42 % digits and box
pieces), so losses and checkpoint choice measured coordinates. The distillation experiment (``kd_pipeline.repro``)
needs tasks where the image decides the answer. This profile changes only what is generated, not the formats:

- One image per record, drawn for its question. VQA asks LRBEN's three question types (``REPRO_VQA_TYPES``) with
  answers balanced per question text by construction: ``presence`` draws the kind and Yes/No uniformly, then a scene
  that has (1-2 of) or lacks the kind; ``comparison`` draws two kinds and Yes/No, then counts that make the answer
  true; ``rural_urban`` draws the class uniformly (``count``, a kind and a count 0-3, stays available to
  ``balanced_vqa`` but is not asked: see ``REPRO_VQA_TYPES``). Scenes that must contain a kind come from classes
  where it occurs, so the scene itself carries the evidence. An object that finds no free spot is dropped and the answer follows
  the drawn objects, so answers are always true of the image.
- Region captions carry no size word (the box in the prompt already gives the size): what is left to say is the
  colour and the place the image shows.
- Record mix (``HEADLINE_WEIGHTS``): scene 30 %, VQA 30 %, region captions 30 %, referring 10 %; no grounded
  descriptions or multi-round records.
- ``ambiguous=True`` (condition (c) of the experiment): two confusable pairs (dense/sparse residential,
  forest/meadow) are rendered as a blend of both textures with a latent weight m ~ U(0, 1), and the annotated label
  is drawn from the posterior P(dominant class | m) = sigmoid(|m - 1/2| / POSTERIOR_TEMPERATURE): near m = 1/2 the
  label is a coin flip, far from it almost certain. Training text uses the drawn label (``Scene.label``); benchmark
  ground truth is the most probable class (the dominant one), as a clean test set would be.
"""

from __future__ import annotations

import math

import numpy as np

from data_prep.synth_text import (IDENTIFY_PROMPT, SCENE_PROMPTS, VQA_SUFFIX, VQA_TEMPLATES, VQA_TYPES, refer_round,
                                  region_caption)
from data_prep.synth_textures import TEXTURES, imaging_conditions
from data_prep.synth_world import (OBJECT_KINDS, SCENE_CLASSES, Scene, SceneClass, draw_objects, place_objects,
                                   render_scene)

HEADLINE_WEIGHTS = {"scene": 0.30, "vqa": 0.30, "identify": 0.30, "refer": 0.10}
# RSVQA-LRBEN's own question types (GeoChat reports these three); counts (HRBEN-style, 0-3) stayed at chance for every
# model in the pilot (see README), so this profile leaves them out and gives their share to the other three.
REPRO_VQA_TYPES = ("presence", "comparison", "rural_urban")
AMBIGUOUS_PAIRS = (("dense residential", "sparse residential"), ("forest", "meadow"))
POSTERIOR_TEMPERATURE = 0.1  # m = 0.6 -> the dominant class is the label 73 % of the time; m = 0.8 -> 95 %
MAX_FORCED_COUNT = 3
CLASS_BY_NAME = {scene_class.name: scene_class for scene_class in SCENE_CLASSES}
PARTNER = {name: other for pair in AMBIGUOUS_PAIRS for name, other in (pair, pair[::-1])}


def classes_with(kind: str) -> list[SceneClass]:
    return [scene_class for scene_class in SCENE_CLASSES if kind in scene_class.object_counts]


def label_posterior(weight: float) -> float:
    """P(label = dominant class) for a blend whose dominant texture has weight ``weight`` in [1/2, 1]."""
    return 1.0 / (1.0 + math.exp(-(weight - 0.5) / POSTERIOR_TEMPERATURE))


def make_scene(rng: np.random.Generator, scene_class: SceneClass, image_size: int,
               counts: dict[str, int] | None = None, ambiguous: bool = False) -> Scene:
    """A scene of ``scene_class``; with ``ambiguous`` a class of an ambiguous pair becomes a blend (module doc)."""
    if not ambiguous or scene_class.name not in PARTNER:
        return render_scene(rng, scene_class, image_size, counts)
    partner = CLASS_BY_NAME[PARTNER[scene_class.name]]
    weight = float(rng.uniform(0.0, 1.0))  # weight of scene_class's texture
    own, own_masks = TEXTURES[scene_class.name](rng, image_size)
    other, other_masks = TEXTURES[partner.name](rng, image_size)
    dominant, masks = (scene_class, own_masks) if weight >= 0.5 else (partner, other_masks)
    background = imaging_conditions(rng, weight * own + (1.0 - weight) * other)  # (S, S, 3) uint8
    objects = place_objects(rng, dominant, masks, counts=counts)
    posterior = label_posterior(max(weight, 1.0 - weight))
    label = dominant if rng.random() < posterior else (partner if dominant is scene_class else scene_class)
    return Scene(dominant, objects, draw_objects(background, objects), label_class=label, posterior=posterior)


def _count(scene: Scene, kind: str) -> int:
    return sum(scene_object.kind == kind for scene_object in scene.objects)


def _template(rng: np.random.Generator, question_type: str) -> str:
    return str(rng.choice(VQA_TEMPLATES[question_type]))


def balanced_vqa(rng: np.random.Generator, image_size: int, question_type: str,
                 ambiguous: bool = False) -> tuple[Scene, str, str]:
    """(scene, question without the answer-format suffix, answer) with the answer balanced per question text."""
    kinds = list(OBJECT_KINDS)
    if question_type == "rural_urban":
        scene = make_scene(rng, SCENE_CLASSES[rng.integers(len(SCENE_CLASSES))], image_size, ambiguous=ambiguous)
        return scene, _template(rng, question_type), scene.scene_class.area
    if question_type == "presence":
        kind = kinds[rng.integers(len(kinds))]
        present = rng.random() < 0.5
        pool = classes_with(kind) if present else list(SCENE_CLASSES)
        counts = {kind: int(rng.integers(1, 3)) if present else 0}
        scene = make_scene(rng, pool[rng.integers(len(pool))], image_size, counts, ambiguous)
        question = _template(rng, question_type).format(kind=kind, plural=OBJECT_KINDS[kind].plural)
        return scene, question, "Yes" if _count(scene, kind) else "No"
    if question_type == "count":
        kind = kinds[rng.integers(len(kinds))]
        target = int(rng.integers(0, MAX_FORCED_COUNT + 1))
        pool = classes_with(kind) if target else list(SCENE_CLASSES)
        scene = make_scene(rng, pool[rng.integers(len(pool))], image_size, {kind: target}, ambiguous)
        question = _template(rng, question_type).format(kind=kind, plural=OBJECT_KINDS[kind].plural)
        return scene, question, str(_count(scene, kind))
    if question_type == "comparison":
        first, second = (kinds[index] for index in rng.choice(len(kinds), 2, replace=False))
        if rng.random() < 0.5:  # Yes: more of the first kind
            first_count = int(rng.integers(1, MAX_FORCED_COUNT + 1))
            second_count = int(rng.integers(0, first_count))
        else:  # No: at most as many
            second_count = int(rng.integers(0, MAX_FORCED_COUNT + 1))
            first_count = int(rng.integers(0, second_count + 1))
        anchor = first if first_count else second if second_count else None
        pool = classes_with(anchor) if anchor else list(SCENE_CLASSES)
        scene = make_scene(rng, pool[rng.integers(len(pool))], image_size, {first: first_count, second: second_count},
                           ambiguous)
        question = _template(rng, question_type).replace("{other_plural}", OBJECT_KINDS[second].plural)
        question = question.format(kind=first, plural=OBJECT_KINDS[first].plural)
        return scene, question, "Yes" if _count(scene, first) > _count(scene, second) else "No"
    raise ValueError(f"unknown VQA question type {question_type!r}; expected one of {', '.join(VQA_TYPES)}")


def headline_record(rng: np.random.Generator, scene_class: SceneClass, image_size: int, record_type: str,
                    ambiguous: bool = False) -> tuple[Scene, list[dict]]:
    """One single-round record of ``record_type`` on its own image: (scene, GeoChat conversation turns).

    ``scene_class`` is used by the scene, identify and refer records (the caller keeps classes balanced); VQA
    records draw their own scene (``balanced_vqa``)."""
    if record_type == "vqa":
        kind = REPRO_VQA_TYPES[rng.integers(len(REPRO_VQA_TYPES))]
        scene, question, answer = balanced_vqa(rng, image_size, kind, ambiguous)
        question = f"{question}\n{VQA_SUFFIX}"
    elif record_type == "scene":
        scene = make_scene(rng, scene_class, image_size, ambiguous=ambiguous)
        question, answer = str(rng.choice(SCENE_PROMPTS)), scene.label.name
    elif record_type in ("identify", "refer"):
        while True:  # a scene with something to point at
            scene = make_scene(rng, scene_class, image_size, ambiguous=ambiguous)
            if record_type == "identify" and scene.objects:
                scene_object = scene.objects[rng.integers(len(scene.objects))]
                question = IDENTIFY_PROMPT.format(box=scene_object.box_text)
                answer = region_caption(scene, scene_object, size_words=False)
                break
            if record_type == "refer" and (round_ := refer_round(rng, scene)) is not None:
                question, answer = round_
                break
    else:
        raise ValueError(f"unknown record type {record_type!r}; expected one of {', '.join(HEADLINE_WEIGHTS)}")
    question = f"<image>\n{question}" if rng.random() < 0.5 else f"{question}\n<image>"
    return scene, [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
