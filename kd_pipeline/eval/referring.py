"""Referring expression / grounding scores (GeoChat-Bench referring.jsonl; paper Table 6).

Each answer's boxes (`boxes.parse_boxes`) are scaled to the image size, rotated (sign convention in `boxes`),
and compared with the ground truth (box text or pixel polygons) by polygon IoU; with several boxes on either side
the sample IoU is the greedy one-to-one matched IoU of `boxes.matched_iou`. A sample is correct at threshold t when
its IoU >= t. An answer with no parsable box (garbage, empty, over-long) has IoU 0 and counts as `unparsable`.

Image size: `image_size_of(record)` (see `images.image_size_lookup`) gives (width, height); when it returns None
everything stays on the 0-100 grid. GeoChat-Bench ground truths are pixel polygons, which cannot be compared on
the grid: if such a record (a coordinate above 100) has no image size, scoring stops with an error asking for
--image-dir / --image-size rather than returning meaningless numbers.

Metrics (fractions in [0, 1]): acc@0.5, acc@0.25 and mean_iou overall; the same with n for each `type` (by_type;
GeoChat-Bench: "ref", "grounding", ...) and each `size_group` (by_size_group); n; unparsable;
skipped_no_ground_truth; invalid_ground_truth (ground truths with no usable shape, left out and warned about).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kd_pipeline.eval.boxes import (
    GRID_SIZE,
    box_polygon,
    ground_truth_polygons,
    matched_iou,
    max_coordinate,
    parse_boxes,
)
from kd_pipeline.eval.images import ImageSizeLookup, record_image_size
from kd_pipeline.eval.records import answer_text, split_missing_ground_truth
from kd_pipeline.eval.uncertainty import binomial_se, mean_se

logger = logging.getLogger(__name__)

THRESHOLDS = (0.5, 0.25)
UNSPECIFIED_GROUP = "unspecified"


def sample_iou(record: Mapping[str, Any], image_size: tuple[float, float] | None) -> tuple[float, bool] | None:
    """(IoU, answer parsable) of one canonical record; None when its ground truth has no usable shape.

    Raises:
        ValueError: the ground truth is in pixels (coordinates above 100) but no image size is known.
    """
    width, height = image_size if image_size is not None else (GRID_SIZE, GRID_SIZE)
    truth = ground_truth_polygons(record.get("ground_truth"), width, height)
    if truth is None:
        return None
    if image_size is None and max_coordinate(truth) > GRID_SIZE:
        raise ValueError(
            f"referring: question {record.get('question_id')!r} has a pixel-polygon ground truth (coordinates up to "
            f"{max_coordinate(truth):.0f}) but no image size is known: pass --image-dir (images named image_id.png) "
            "or --image-size WIDTH HEIGHT, or add width/height fields to the records"
        )
    answer = answer_text(record)
    predicted = [box_polygon(grid_box, width, height) for grid_box in parse_boxes(answer)] if answer else []
    if not predicted:
        return 0.0, False
    return matched_iou(predicted, truth), True


def score_referring(
    records: Iterable[Mapping[str, Any]],
    image_size_of: ImageSizeLookup = record_image_size,
    thresholds: Sequence[float] = THRESHOLDS,
) -> dict[str, Any]:
    """Score referring/grounding answer records; see the module docstring for the rules and the metrics.

    Raises:
        ValueError: no record has a ground truth, or pixel ground truths come without image sizes.
    """
    scored, skipped = split_missing_ground_truth(records, "referring")
    ious: list[float] = []
    groups_by_key: dict[str, list[str]] = {"type": [], "size_group": []}
    unparsable = invalid = 0
    for record in scored:
        outcome = sample_iou(record, image_size_of(record))
        if outcome is None:
            invalid += 1
            continue
        iou, parsable = outcome
        ious.append(iou)
        unparsable += not parsable
        for key, groups in groups_by_key.items():
            value = record.get(key)
            groups.append(str(value) if value not in (None, "") else UNSPECIFIED_GROUP)
    if invalid:
        logger.warning("referring: %d ground truth(s) have no usable box or polygon and are left out", invalid)
    if not ious:
        raise ValueError("referring: no record has a usable ground truth (box text or a list of [x, y] polygons)")

    return {
        "task": "referring",
        "n": len(ious),
        "unparsable": unparsable,
        "skipped_no_ground_truth": skipped,
        "invalid_ground_truth": invalid,
        **_accuracies(ious, thresholds),
        "by_type": _grouped(ious, groups_by_key["type"], thresholds),
        "by_size_group": _grouped(ious, groups_by_key["size_group"], thresholds),
    }


def _accuracies(ious: Sequence[float], thresholds: Sequence[float]) -> dict[str, float]:
    """acc@t (and its binomial ``acc@t_se``) per threshold, mean IoU and the SE of that mean."""
    metrics: dict[str, float] = {}
    for threshold in thresholds:
        accuracy = sum(iou >= threshold for iou in ious) / len(ious)
        metrics[f"acc@{threshold:g}"] = accuracy
        metrics[f"acc@{threshold:g}_se"] = binomial_se(accuracy, len(ious))
    metrics["mean_iou"] = sum(ious) / len(ious)
    metrics["mean_iou_se"] = mean_se(ious)
    return metrics


def _grouped(ious: Sequence[float], groups: Sequence[str], thresholds: Sequence[float]) -> dict[str, dict[str, float]]:
    ious_by_group: dict[str, list[float]] = defaultdict(list)
    for iou, group in zip(ious, groups):
        ious_by_group[group].append(iou)
    return {
        group: {"n": len(group_ious), **_accuracies(group_ious, thresholds)}
        for group, group_ious in sorted(ious_by_group.items())
    }
