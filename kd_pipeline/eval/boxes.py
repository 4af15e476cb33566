"""GeoChat box text: parsing `{<x1><y1><x2><y2>|<θ>}`, rotated-box polygons, polygon IoU and box matching.

Box text. Coordinates are numbers on a 0-100 grid of the image width (x) and height (y); θ is an angle in degrees
and may be absent (`{<x1><y1><x2><y2>}`, θ = 0). Several boxes follow each other (`{...}{...}`) and any text may
surround them. Whitespace inside a box, decimals, a minus sign and a bare angle (`|45`) are accepted; anything
that does not match is ignored (a garbage answer simply has no boxes). Corners may come in any order: the box is
the axis-aligned rectangle spanned by them before rotation.

Geometry. Grid coordinates are scaled to pixels first (x * width / 100, y * height / 100), then the rectangle is
rotated about its centre, so a rotated box keeps its right angles on non-square images. With no image size known
the polygon stays on the 0-100 grid (width = height = 100).

Sign convention (the same as GeoChat's demo helper `bbox_and_angle_to_polygon`, and shapely's `rotate`): in image
coordinates (x to the right, y DOWN) a corner offset (dx, dy) from the centre goes to
    (dx cos θ - dy sin θ,  dx sin θ + dy cos θ).
So a positive θ turns the box CLOCKWISE as seen on screen (y pointing down), which is counter-clockwise in the usual
math frame with y pointing up. Example: θ = 90 sends the top-right corner offset (+w/2, -h/2) to (+h/2, +w/2),
the bottom-right on screen.

Several boxes (`matched_iou`). Predicted and ground-truth polygons are matched one-to-one greedily by descending IoU
(COCO-style matching; scipy's optimal assignment is not installed and differs only when pairs conflict); the
sample's IoU is the sum of matched IoUs divided by max(#predicted, #ground truth), so missing and extra boxes both
count as IoU 0. With one box on each side this is the plain IoU.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import shapely
from shapely import affinity
from shapely.geometry import Polygon, box as axis_aligned_box

GRID_SIZE = 100.0

# Each number starts with "<", so no two whitespace runs are adjacent and the pattern cannot backtrack badly.
_NUMBER = r"<\s*(-?\d+(?:\.\d+)?)\s*>\s*"
BOX_PATTERN = re.compile(r"\{\s*" + _NUMBER * 4 + r"(?:\|\s*<?\s*(-?\d+(?:\.\d+)?)\s*>?\s*)?\}")


@dataclass(frozen=True)
class GridBox:
    """A box as written in GeoChat text: corners on the 0-100 grid and a rotation in degrees (see module doc)."""

    x1: float
    y1: float
    x2: float
    y2: float
    angle_deg: float = 0.0


def parse_boxes(text: Any) -> list[GridBox]:
    """All boxes in `text`, in order of appearance; [] for non-strings and text without boxes. Never raises."""
    if not isinstance(text, str):
        return []
    boxes = []
    for match in BOX_PATTERN.finditer(text):
        x1, y1, x2, y2 = (float(value) for value in match.groups()[:4])
        angle = float(match.group(5)) if match.group(5) is not None else 0.0
        if all(math.isfinite(value) for value in (x1, y1, x2, y2, angle)):
            boxes.append(GridBox(x1, y1, x2, y2, angle))
    return boxes


def box_polygon(grid_box: GridBox, width: float = GRID_SIZE, height: float = GRID_SIZE) -> Polygon:
    """The rotated rectangle of `grid_box` in pixel coordinates of a width x height image (see module doc)."""
    x_scale, y_scale = width / GRID_SIZE, height / GRID_SIZE
    left, right = sorted((grid_box.x1 * x_scale, grid_box.x2 * x_scale))
    top, bottom = sorted((grid_box.y1 * y_scale, grid_box.y2 * y_scale))
    rectangle = axis_aligned_box(left, top, right, bottom)
    if grid_box.angle_deg == 0.0:
        return rectangle
    # shapely's matrix is [[cos, -sin], [sin, cos]]: exactly the documented (dx cos - dy sin, dx sin + dy cos).
    return affinity.rotate(rectangle, grid_box.angle_deg, origin=((left + right) / 2, (top + bottom) / 2))


def ground_truth_polygons(
    ground_truth: Any, width: float = GRID_SIZE, height: float = GRID_SIZE
) -> list[Polygon] | None:
    """Ground-truth polygons in pixels, or None when `ground_truth` has no usable shape.

    Accepted: box text (scaled like predictions); a list of polygons, each a list of [x, y] pixel points (GeoChat-
    Bench referring); a single polygon as a list of [x, y]; a flat list [x1, y1, x2, y2, ...] of one polygon.
    Point lists are already in pixels and are not scaled. Self-intersecting polygons are repaired with
    `shapely.make_valid` so their area is meaningful.
    """
    if isinstance(ground_truth, str):
        boxes = parse_boxes(ground_truth)
        return [box_polygon(grid_box, width, height) for grid_box in boxes] or None
    if not isinstance(ground_truth, (list, tuple)) or not ground_truth:
        return None
    if _is_point(ground_truth[0]):
        shapes = [ground_truth]
    elif all(_is_number(value) for value in ground_truth):
        if len(ground_truth) % 2:
            return None
        shapes = [[ground_truth[index : index + 2] for index in range(0, len(ground_truth), 2)]]
    else:
        shapes = ground_truth
    polygons = []
    for points in shapes:
        if not isinstance(points, (list, tuple)) or len(points) < 3 or not all(_is_point(point) for point in points):
            return None
        polygon = Polygon([(float(x), float(y)) for x, y in points])
        polygons.append(polygon if polygon.is_valid else shapely.make_valid(polygon))
    return polygons


def max_coordinate(polygons: Sequence[Any]) -> float:
    """The largest absolute vertex coordinate over `polygons` (used to detect pixel polygons)."""
    largest = 0.0
    for polygon in polygons:
        min_x, min_y, max_x, max_y = polygon.bounds
        largest = max(largest, abs(min_x), abs(min_y), abs(max_x), abs(max_y))
    return largest


def polygon_iou(first: Any, second: Any) -> float:
    """Intersection over union of two shapely geometries; 0 for empty or zero-area unions."""
    intersection = first.intersection(second).area
    union = first.area + second.area - intersection
    return float(intersection / union) if union > 0 else 0.0


def matched_iou(predicted: Sequence[Any], ground_truth: Sequence[Any]) -> float:
    """Greedy one-to-one matched IoU, averaged over max(len(predicted), len(ground_truth)); 0 if either is empty."""
    if not predicted or not ground_truth:
        return 0.0
    pairs = sorted(
        ((polygon_iou(pred, truth), pred_index, truth_index)
         for pred_index, pred in enumerate(predicted)
         for truth_index, truth in enumerate(ground_truth)),
        reverse=True,
    )
    used_predicted: set[int] = set()
    used_truth: set[int] = set()
    total = 0.0
    for iou, pred_index, truth_index in pairs:
        if iou <= 0.0:
            break
        if pred_index in used_predicted or truth_index in used_truth:
            continue
        used_predicted.add(pred_index)
        used_truth.add(truth_index)
        total += iou
    return total / max(len(predicted), len(ground_truth))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_point(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(coordinate) for coordinate in value)
