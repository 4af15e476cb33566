"""PNG figures for the report: scene confusion matrices (paper Fig. 4) and grounding examples (paper Fig. 5).

Figures are drawn on `matplotlib.figure.Figure` with the Agg canvas directly, so no pyplot state or display
backend is involved (safe on headless nodes and inside other programs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Polygon as PolygonPatch

from kd_pipeline.eval.boxes import box_polygon, ground_truth_polygons, parse_boxes
from kd_pipeline.eval.images import image_path, open_rgb_image
from kd_pipeline.eval.records import answer_text, canonical_record
from kd_pipeline.eval.scene import UNPARSABLE_LABEL

GROUND_TRUTH_COLOUR = "lime"
PREDICTION_COLOUR = "red"
MAX_ANNOTATED_CLASSES = 30  # beyond this the per-cell numbers are unreadable


def plot_confusion_matrix(confusion: Mapping[str, Any], out_path: str | Path, title: str) -> Path:
    """Row-normalised confusion matrix (percent of each true class) as a PNG; returns the path.

    `confusion` is the scene scorer's {"true_labels", "predicted_labels", "matrix"}; the "<unparsable>" column is
    drawn only when some answer landed there.
    """
    true_labels = list(confusion["true_labels"])
    predicted_labels = list(confusion["predicted_labels"])
    matrix = [list(row) for row in confusion["matrix"]]
    if UNPARSABLE_LABEL in predicted_labels:
        column = predicted_labels.index(UNPARSABLE_LABEL)
        if not any(row[column] for row in matrix):
            predicted_labels.pop(column)
            matrix = [row[:column] + row[column + 1 :] for row in matrix]
    percent = [[100.0 * count / max(sum(row), 1) for count in row] for row in matrix]

    size = max(5.0, 0.4 * len(predicted_labels) + 2.0)
    figure = Figure(figsize=(size, size * 0.9))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(percent, cmap="Blues", vmin=0.0, vmax=100.0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="% of true class")
    axes.set_xticks(range(len(predicted_labels)), predicted_labels, rotation=90, fontsize=7)
    axes.set_yticks(range(len(true_labels)), true_labels, fontsize=7)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(title)
    if len(predicted_labels) <= MAX_ANNOTATED_CLASSES:
        for row_index, row in enumerate(percent):
            for column_index, value in enumerate(row):
                if value > 0:
                    axes.text(column_index, row_index, f"{value:.0f}", ha="center", va="center", fontsize=6,
                              color="white" if value > 50 else "black")
    figure.tight_layout()
    return _save(figure, out_path)


def plot_grounding_examples(
    records_by_model: Mapping[str, Sequence[Mapping[str, Any]]],
    image_dir: str | Path,
    out_path: str | Path,
    max_examples: int = 4,
) -> Path:
    """Grid of grounding examples: one row per question, first the image with its ground truth (green, titled
    with the question), then one column per model with ground truth (green) and that model's predicted boxes
    (red). Returns the path.

    Questions are taken in the first model's order among those every model answered whose ground truth is a
    usable shape; images are read from `image_dir` (`image_id + ".png"` or `image`).

    Raises:
        ValueError: no question is shared by all models with a usable ground truth.
        FileNotFoundError: an example's image is missing.
    """
    model_names = list(records_by_model)
    by_model = {
        name: {str(record.get("question_id")): record for record in map(canonical_record, records)}
        for name, records in records_by_model.items()
    }
    first = by_model[model_names[0]] if model_names else {}
    question_ids = [
        question_id for question_id, record in first.items()
        if all(question_id in answers for answers in by_model.values())
        and ground_truth_polygons(record.get("ground_truth")) is not None
    ][:max_examples]
    if not question_ids:
        raise ValueError("grounding examples: no question answered by every model has a usable ground truth")

    columns = 1 + len(model_names)
    figure = Figure(figsize=(3.0 * columns, 3.0 * len(question_ids)))
    FigureCanvasAgg(figure)
    for row, question_id in enumerate(question_ids):
        reference = first[question_id]
        image = open_rgb_image(image_path(reference, image_dir))
        width, height = image.size
        truth = ground_truth_polygons(reference.get("ground_truth"), width, height) or []
        question = reference.get("question")
        first_title = question[:40] if isinstance(question, str) and question else f"question {question_id}"
        panels = [(first_title, None)] + [(name, by_model[name][question_id]) for name in model_names]
        for column, (panel_title, record) in enumerate(panels):
            axes = figure.add_subplot(len(question_ids), columns, row * columns + column + 1)
            axes.imshow(image)
            axes.set_axis_off()
            axes.set_title(panel_title, fontsize=8)
            _draw_shapes(axes, truth, GROUND_TRUTH_COLOUR)
            if record is not None:
                predicted = [box_polygon(grid_box, width, height) for grid_box in parse_boxes(answer_text(record))]
                _draw_shapes(axes, predicted, PREDICTION_COLOUR)
    figure.tight_layout()
    return _save(figure, out_path)


def _draw_shapes(axes: Any, geometries: Sequence[Any], colour: str) -> None:
    for geometry in geometries:
        parts = getattr(geometry, "geoms", [geometry])
        for part in parts:
            if part.geom_type == "Polygon" and not part.is_empty:
                axes.add_patch(PolygonPatch(list(part.exterior.coords), closed=True, fill=False,
                                            edgecolor=colour, linewidth=1.5))


def _save(figure: Figure, out_path: str | Path) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_path, dpi=120)
    return out_path
