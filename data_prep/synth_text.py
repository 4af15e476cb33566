"""The language side of the synthetic world: GeoChat-style prompts, answers, captions and corpus lines.

Every function reads a rendered ``Scene`` (or a class and its objects) and returns text; all wording lives here.
Prompts follow GeoChat's data: task tags at the start of a human turn (``[refer]``, ``[identify]``,
``[grounding]``), VQA and classification asking for a single word or phrase, boxes as
``{<x1><y1><x2><y2>|<theta>}`` (see ``synth_world`` for the grid and rotation convention) and phrases as ``<p>..</p>``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from data_prep.synth_world import OBJECT_KINDS, SCENE_CLASSES, Scene, SceneClass, SceneObject

CLASS_LIST = ", ".join(scene_class.name for scene_class in SCENE_CLASSES)
BENCH_SCENE_PROMPT = (f"Classify the given image in one of the following classes. Classes: {CLASS_LIST} \n"
                      "Answer in one word or a short phrase.")
SCENE_PROMPTS = (
    BENCH_SCENE_PROMPT,
    f"Classify the image within one of the given classes: {CLASS_LIST}. Answer with one word or a short phrase.",
    f"Which of these scene classes fits the image best: {CLASS_LIST}? Answer in one word or a short phrase.",
)
VQA_SUFFIX = "Answer the question using a single word or phrase."
VQA_TYPES = ("presence", "comparison", "rural_urban", "count")
VQA_TEMPLATES = {
    "presence": ("Is there a {kind} in the image?", "Are there any {plural} in this image?",
                 "Is a {kind} present in the image?"),
    "count": ("How many {plural} are there in the image?", "How many {plural} can be seen?",
              "What is the number of {plural} in the image?"),
    "comparison": ("Are there more {plural} than {other_plural}?",
                   "Is the number of {plural} larger than the number of {other_plural}?"),
    "rural_urban": ("Is this a rural or an urban area?", "Is it a rural or an urban area?"),
}
REFER_PROMPT = "[refer] Give me the location of <p> {phrase} </p>"
GROUP_REFER_PROMPT = "[grounding] Give me the location of <p> {phrase} </p>"
IDENTIFY_PROMPT = "[identify] What is the object present at {box}"
GROUNDING_PROMPT = "[grounding] Describe the image in detail"
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
# One sentence of each pair closes a corpus line: general knowledge that ties the class name to what it looks like.
CLASS_FACTS = {
    "forest": ("Forests are dense tree canopies with only a few clearings.", "A forest looks dark green and rough."),
    "meadow": ("Meadows are open grassland with scattered trees.", "A meadow is light green with soft patches."),
    "farmland": ("Farmland is split into rectangular fields with crop rows.", "Fields are separated by dirt tracks."),
    "desert": ("Deserts are sandy with long parallel dunes.", "A desert has almost no vegetation."),
    "lake": ("A lake is a body of water surrounded by a sandy rim and land.", "Small boats may sail on a lake."),
    "harbour": ("Harbours have a straight coast with piers where ships are moored.",
                "Storage tanks and vehicles stand on the quay of a harbour."),
    "dense residential": ("Dense residential areas have houses packed along a grid of streets.",
                          "In a dense residential area little ground is left between the roofs."),
    "sparse residential": ("Sparse residential areas have scattered houses with lawns and trees.",
                           "Streets in a sparse residential area form a grid with green blocks."),
    "industrial area": ("Industrial areas have large flat warehouse roofs and storage tanks.",
                        "Concrete ground covers most of an industrial area."),
    "airport": ("Airports have a long runway with a dashed centre line and an apron for planes.",
                "Planes are parked on the apron or taxi along the runway."),
}


@dataclass(frozen=True)
class Expression:
    """A referring phrase and the objects it denotes (indices into Scene.objects, in reading order)."""

    phrase: str
    obj_ids: tuple[int, ...]


# ---- phrases ----

def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _kind_count(scene: Scene, kind: str) -> int:
    return sum(scene_object.kind == kind for scene_object in scene.objects)


def _reading_order(scene: Scene, obj_ids: Sequence[int]) -> tuple[int, ...]:
    """Objects sorted top to bottom, then left to right (the order of several boxes in one answer)."""
    return tuple(sorted(obj_ids, key=lambda index: (scene.objects[index].centre[1], scene.objects[index].centre[0])))


def boxes_text(scene: Scene, obj_ids: Sequence[int]) -> str:
    return "".join(scene.objects[index].box_text for index in obj_ids)


def region_caption(scene: Scene, scene_object: SceneObject, size_words: bool = True, annotated: bool = True) -> str:
    """'a large red ship moored in a harbour' (medium objects get no size word; ``size_words=False`` drops them all,
    since the box in the prompt already gives the size). The place is the annotator's class (``scene.label``), or
    with ``annotated=False`` the class that shaped the scene (the correct answer of an ambiguous scene)."""
    size_word = {"small": "small ", "medium": "", "large": "large "}[scene_object.size_group] if size_words else ""
    kind = OBJECT_KINDS[scene_object.kind]
    place = (scene.label if annotated else scene.scene_class).place_phrase
    return f"{_with_article(f'{size_word}{scene_object.colour} {kind.name}')} {kind.verb} {place}"


def referring_expressions(scene: Scene) -> tuple[list[Expression], list[Expression]]:
    """(single-object expressions that are unique in the scene, several-object expressions).

    A single object is named with the fewest attributes that make the phrase unique, trying: kind; colour;
    position; colour + position; size + colour + position. Groups are "all the <plural>" and
    "the <colour> <plural>" when at least two objects match.
    """
    singles: list[Expression] = []
    attribute_sets = ((), ("colour",), ("position",), ("colour", "position"), ("size", "colour", "position"))
    for index, target in enumerate(scene.objects):
        for attributes in attribute_sets:
            matches = [other_index for other_index, other in enumerate(scene.objects)
                       if other.kind == target.kind
                       and ("colour" not in attributes or other.colour == target.colour)
                       and ("position" not in attributes or other.position == target.position)
                       and ("size" not in attributes or other.size_group == target.size_group)]
            if matches == [index]:
                size_word = target.size_group + " " if "size" in attributes else ""
                colour_word = target.colour + " " if "colour" in attributes else ""
                location = f" at the {target.position}" if "position" in attributes else ""
                singles.append(Expression(f"the {size_word}{colour_word}{target.kind}{location}", (index,)))
                break
    groups: list[Expression] = []
    for kind in OBJECT_KINDS.values():
        of_kind = [index for index, scene_object in enumerate(scene.objects) if scene_object.kind == kind.name]
        if len(of_kind) >= 2:
            groups.append(Expression(f"all the {kind.plural}", _reading_order(scene, of_kind)))
        for colour, count in sorted(Counter(scene.objects[index].colour for index in of_kind).items()):
            same_colour = [index for index in of_kind if scene.objects[index].colour == colour]
            if count >= 2 and len(same_colour) < len(of_kind):
                groups.append(Expression(f"the {colour} {kind.plural}", _reading_order(scene, same_colour)))
    return singles, groups


# ---- question/answer rounds: each returns (question, answer) or None when the scene cannot support it ----

def scene_round(rng: np.random.Generator, scene: Scene) -> tuple[str, str]:
    return str(rng.choice(SCENE_PROMPTS)), scene.label.name


def vqa_round(rng: np.random.Generator, scene: Scene, question_type: str) -> tuple[str, str]:
    """A VQA question of ``question_type`` without the answer-format suffix, and its answer."""
    template = str(rng.choice(VQA_TEMPLATES[question_type]))
    if question_type == "rural_urban":
        return template, scene.scene_class.area
    present = sorted({scene_object.kind for scene_object in scene.objects})
    class_kinds = list(scene.scene_class.object_counts)
    if question_type == "presence":
        # Ask about a present kind 65% of the time when there is one; scenes without objects can only get "No",
        # so overall "Yes" and "No" come out roughly even and neither is a free answer.
        absent = [kind for kind in OBJECT_KINDS if kind not in present]
        pool = present if present and (not absent or rng.random() < 0.65) else absent
        kind = str(rng.choice(pool))
        answer = "Yes" if kind in present else "No"
    elif question_type == "count":
        kind = str(rng.choice(present if present and rng.random() < 0.8 else class_kinds))
        answer = str(_kind_count(scene, kind))
    else:
        pool = class_kinds if len(class_kinds) >= 2 and rng.random() < 0.8 else list(OBJECT_KINDS)
        kind, other_kind = (str(name) for name in rng.choice(pool, 2, replace=False))
        answer = "Yes" if _kind_count(scene, kind) > _kind_count(scene, other_kind) else "No"
        template = template.replace("{other_plural}", OBJECT_KINDS[other_kind].plural)
    return template.format(kind=kind, plural=OBJECT_KINDS[kind].plural), answer


def refer_round(rng: np.random.Generator, scene: Scene) -> tuple[str, str] | None:
    singles, groups = referring_expressions(scene)
    if groups and (not singles or rng.random() < 0.3):
        expression = groups[rng.integers(len(groups))]
        # Several objects: the benchmark asks these with [grounding]; train both tags so either prompt works.
        prompt = GROUP_REFER_PROMPT if rng.random() < 0.5 else REFER_PROMPT
    elif singles:
        expression, prompt = singles[rng.integers(len(singles))], REFER_PROMPT
    else:
        return None
    return prompt.format(phrase=expression.phrase), boxes_text(scene, expression.obj_ids)


def identify_round(rng: np.random.Generator, scene: Scene) -> tuple[str, str] | None:
    if not scene.objects:
        return None
    scene_object = scene.objects[rng.integers(len(scene.objects))]
    return IDENTIFY_PROMPT.format(box=scene_object.box_text), region_caption(scene, scene_object)


def grounded_description(scene: Scene) -> str:
    """'This is an aerial image of a harbour, an urban area. It shows <p>two ships</p> {..}{..} and ...'."""
    scene_class = scene.scene_class
    opening = f"This is an aerial image of {scene_class.place_phrase.split(' ', 1)[1]}, " \
              f"{_with_article(scene_class.area)} area."
    parts = []
    for kind in OBJECT_KINDS.values():
        of_kind = _reading_order(scene, [index for index, scene_object in enumerate(scene.objects)
                                         if scene_object.kind == kind.name])
        if not of_kind:
            continue
        colours = {scene.objects[index].colour for index in of_kind}
        colour_word = f"{next(iter(colours))} " if len(colours) == 1 else ""
        noun = kind.name if len(of_kind) == 1 else kind.plural
        counted = _with_article(colour_word + noun) if len(of_kind) == 1 else \
            f"{NUMBER_WORDS[len(of_kind)]} {colour_word}{noun}"
        parts.append(f"<p>{counted}</p> {boxes_text(scene, of_kind)}")
    if not parts:
        return f"{opening} There are no planes, ships, vehicles, storage tanks or buildings in it."
    listing = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{opening} It shows {listing}."


def _single_round(rng: np.random.Generator, scene: Scene, round_type: str) -> tuple[str, str] | None:
    if round_type == "scene":
        return scene_round(rng, scene)
    if round_type == "vqa":
        question, answer = vqa_round(rng, scene, str(rng.choice(VQA_TYPES)))
        return f"{question}\n{VQA_SUFFIX}", answer
    if round_type == "refer":
        return refer_round(rng, scene)
    if round_type == "identify":
        return identify_round(rng, scene)
    return GROUNDING_PROMPT, grounded_description(scene)


def conversation(rng: np.random.Generator, scene: Scene, record_type: str) -> list[dict] | None:
    """Turns of one record, the first human turn holding exactly one <image> (front or end, as in GeoChat)."""
    if record_type == "multi_round":
        round_types = rng.permutation(["scene", "vqa", "vqa", "refer", "identify"])[: rng.integers(2, 4)]
        rounds = [qa for qa in (_single_round(rng, scene, str(kind)) for kind in round_types) if qa is not None]
    else:
        single = _single_round(rng, scene, record_type)
        rounds = [single] if single is not None else []
    if not rounds:
        return None
    first_question = rounds[0][0]
    rounds[0] = (f"<image>\n{first_question}" if rng.random() < 0.5 else f"{first_question}\n<image>", rounds[0][1])
    return [turn for question, answer in rounds
            for turn in ({"from": "human", "value": question}, {"from": "gpt", "value": answer})]


# ---- pre-training corpus ----

def corpus_document(rng: np.random.Generator, scene_class: SceneClass, objects: list[SceneObject]) -> str:
    """One line of the text-only corpus: opening, one sentence per object kind, rural/urban, a class fact."""
    place = scene_class.place_phrase.split(" ", 1)[1]
    sentences = [str(rng.choice([f"An aerial image of {place}.", f"This satellite photo shows {place}.",
                                 f"Seen from above, this is {place}."]))]
    for kind in OBJECT_KINDS.values():
        of_kind = [scene_object for scene_object in objects if scene_object.kind == kind.name]
        if len(of_kind) == 1:
            sentences.append(f"There is one {of_kind[0].colour} {kind.name} {kind.verb} at the {of_kind[0].position}.")
        elif of_kind:
            colour_counts = sorted(Counter(scene_object.colour for scene_object in of_kind).items(),
                                   key=lambda item: (-item[1], item[0]))
            count_word = NUMBER_WORDS[len(of_kind)]
            if len(colour_counts) == 1:
                sentences.append(f"There are {count_word} {colour_counts[0][0]} {kind.plural} {kind.verb} here.")
            else:
                colour_words = [f"{NUMBER_WORDS[count]} {colour}" for colour, count in colour_counts]
                summary = ", ".join(colour_words[:-1]) + " and " + colour_words[-1]
                sentences.append(f"There are {count_word} {kind.plural} {kind.verb} here: {summary}.")
    if not objects:
        sentences.append("No planes, ships, vehicles, storage tanks or buildings can be seen.")
    sentences.append(f"It is {_with_article(scene_class.area)} area.")
    sentences.append(str(rng.choice(CLASS_FACTS[scene_class.name])))
    return " ".join(sentences)
