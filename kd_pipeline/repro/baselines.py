"""Image-free baselines: what the labelled set alone predicts without looking at the image.

Every metric of the experiment is printed beside the best of these, fitted on the student's own labelled records:

- scene: the majority class of the training scene answers (the prompt is the same for every question);
- VQA: question-only: the majority training answer to the exact question text, else to its question type;
- region captions: box-text-only lookup: the most frequent caption among the k = 15 training boxes nearest in
  (width, height, angle / 10) on the 0-100 grid (size and shape tell the kind of object; only the image tells its
  colour and the place);
- grounding: phrase-only: the mean first box of the training answers to the same referring phrase, else the mean
  of all (its acc@0.5 is the floor of that task, printed with it).

The predictions are scored by the same scorers as the models, so the numbers compare directly.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kd_pipeline.eval.boxes import parse_boxes
from kd_pipeline.eval.captioning import score_region_captioning
from kd_pipeline.eval.referring import score_referring
from kd_pipeline.eval.scene import score_scene
from kd_pipeline.eval.vqa import score_vqa
from kd_pipeline.prompts import IMAGE_TOKEN

CAPTION_NEIGHBOURS = 15
IDENTIFY_PREFIX = "[identify]"


def question_answer_pairs(records: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(question text without <image>, answer) for every round of GeoChat instruction records."""
    pairs = []
    for record in records:
        turns = record["conversations"]
        for question, answer in zip(turns[::2], turns[1::2]):
            pairs.append((question["value"].replace(IMAGE_TOKEN, "").strip(), answer["value"].strip()))
    return pairs


def _box_features(text: str) -> np.ndarray | None:
    boxes = parse_boxes(text)
    if not boxes:
        return None
    box = boxes[0]
    return np.array([box.x2 - box.x1, box.y2 - box.y1, box.angle_deg / 10.0])


def _mean_box_text(boxes: list) -> str:
    x1, y1, x2, y2 = (round(float(np.mean([getattr(box, name) for box in boxes]))) for name in ("x1", "y1", "x2", "y2"))
    return f"{{<{x1}><{y1}><{x2}><{y2}>|<0>}}"


class ImageFreePredictor:
    """Fitted on (question, answer) pairs of the labelled set; predicts an answer per benchmark question."""

    def __init__(self, pairs: Sequence[tuple[str, str]], scene_classes: Sequence[str]):
        self.answers_by_question: dict[str, Counter] = defaultdict(Counter)
        for question, answer in pairs:
            self.answers_by_question[question][answer] += 1
        scene_counts = Counter(answer for _, answer in pairs if answer in set(scene_classes))
        self.majority_scene = scene_counts.most_common(1)[0][0] if scene_counts else scene_classes[0]
        identify = [(features, answer) for question, answer in pairs if question.startswith(IDENTIFY_PREFIX)
                    and (features := _box_features(question)) is not None]
        self.caption_features = np.stack([features for features, _ in identify]) if identify else np.zeros((0, 3))
        self.captions = [answer for _, answer in identify]
        self.boxes_by_question: dict[str, list] = defaultdict(list)
        for question, answer in pairs:
            boxes = parse_boxes(answer)
            if boxes and not question.startswith(IDENTIFY_PREFIX):
                self.boxes_by_question[question].append(boxes[0])
        self.all_boxes = [box for boxes in self.boxes_by_question.values() for box in boxes]

    def vqa(self, question: Mapping[str, Any], type_majority: Mapping[str, str]) -> str:
        counts = self.answers_by_question.get(question["prompt"])
        return counts.most_common(1)[0][0] if counts else type_majority.get(question.get("type"), "No")

    def caption(self, question: Mapping[str, Any]) -> str:
        features = _box_features(question["prompt"])
        if features is None or not self.captions:
            return ""
        distances = np.linalg.norm(self.caption_features - features, axis=1)
        nearest = np.argsort(distances, kind="stable")[:CAPTION_NEIGHBOURS]
        return Counter(self.captions[index] for index in nearest).most_common(1)[0][0]

    def grounding(self, question: Mapping[str, Any]) -> str:
        boxes = self.boxes_by_question.get(question["prompt"]) or self.all_boxes
        return _mean_box_text(boxes) if boxes else ""


def image_free_scores(pairs: Sequence[tuple[str, str]], bench: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict:
    """{task: metrics} of the image-free predictions on the normalized benchmark questions (``bench``: task ->
    questions of aid / lrben / region_captioning / referring, whichever are present)."""
    scene_classes = sorted({str(question["ground_truth"]) for question in bench.get("aid", [])})
    predictor = ImageFreePredictor(pairs, scene_classes)
    results: dict[str, Any] = {}

    def answered(questions, answer_of) -> list[dict]:
        return [{**question, "answer": answer_of(question)} for question in questions]

    if bench.get("aid"):
        results["aid"] = score_scene(answered(bench["aid"], lambda _: predictor.majority_scene))
    if bench.get("lrben"):
        by_type: dict[str, Counter] = defaultdict(Counter)
        vqa_prompts = {question["prompt"]: question.get("type") for question in bench["lrben"]}
        for question, answer in pairs:
            if question in vqa_prompts:
                by_type[vqa_prompts[question]][answer] += 1
        type_majority = {kind: counts.most_common(1)[0][0] for kind, counts in by_type.items()}
        results["lrben"] = score_vqa(answered(bench["lrben"], lambda q: predictor.vqa(q, type_majority)))
    if bench.get("region_captioning"):
        results["region_captioning"] = score_region_captioning(answered(bench["region_captioning"], predictor.caption),
                                                               meteor="off")
    if bench.get("referring"):
        results["referring"] = score_referring(answered(bench["referring"], predictor.grounding))
    return results
