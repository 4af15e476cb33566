"""Zero-shot scene classification scores (AID, UCMerced; paper Tables 3-4 and Fig. 4).

GeoChat's rule: the answer with spaces and periods removed, lowercased, must equal the class name, which is the
part of question_id before the first "/" ("<ClassName>/<file>"), lowercased. When question_id has no "/", the
record's ground_truth is the class. Both sides go through the same normalisation (`records.normalize_label`).

Metrics (fractions in [0, 1]):
- oa: overall accuracy, correct / scored records (``oa_se``: its binomial standard error; ``aa_se`` likewise);
- aa: average accuracy, the unweighted mean of the per-class accuracies (differs from OA on unbalanced sets);
- per_class: accuracy of each class (keyed by normalised class name);
- confusion: rows are true classes, columns are predicted classes plus a last "<unparsable>" column for answers
  that name no known class (empty, garbage, over-long or an unknown label);
- n: scored records; unparsable: answers in that last column; skipped_no_ground_truth: records with no class.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from kd_pipeline.eval.records import answer_text, canonical_record, normalize_label
from kd_pipeline.eval.uncertainty import binomial_se, mean_of_groups_se

logger = logging.getLogger(__name__)

UNPARSABLE_LABEL = "<unparsable>"


def class_of(record: Mapping[str, Any]) -> str | None:
    """The normalised true class of a canonical record, or None when neither question_id nor ground_truth has it."""
    question_id = record.get("question_id")
    if isinstance(question_id, str) and "/" in question_id:
        label = question_id.split("/", 1)[0]
    elif isinstance(record.get("ground_truth"), str):
        label = record["ground_truth"]
    else:
        return None
    normalised = normalize_label(label)
    return normalised or None


def score_scene(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Score scene-classification answer records; see the module docstring for the metrics.

    Raises:
        ValueError: no records, or none carries a class (neither "<Class>/<file>" question ids nor ground truths).
    """
    true_labels: list[str] = []
    predicted_labels: list[str] = []
    skipped = 0
    for record in records:
        canonical = canonical_record(record)
        true_class = class_of(canonical)
        if true_class is None:
            skipped += 1
            continue
        answer = answer_text(canonical)
        true_labels.append(true_class)
        predicted_labels.append(normalize_label(answer) if answer is not None else UNPARSABLE_LABEL)
    if not true_labels and not skipped:
        raise ValueError("scene: there are no answer records to score")
    if not true_labels:
        raise ValueError(
            f"scene: none of the {skipped} records has a class: question_id must be '<ClassName>/<file>' or a "
            "ground_truth must be given (pass the benchmark's question file with --questions)"
        )
    if skipped:
        logger.warning("scene: %d record(s) without a class are left out of the scores", skipped)

    classes = sorted(set(true_labels))
    known = set(classes)
    # Answers naming no benchmark class all land in the one extra column, so the matrix stays square + 1.
    predicted_labels = [label if label in known else UNPARSABLE_LABEL for label in predicted_labels]
    column_labels = [*classes, UNPARSABLE_LABEL]
    row_of = {label: index for index, label in enumerate(classes)}
    column_of = {label: index for index, label in enumerate(column_labels)}
    matrix = [[0] * len(column_labels) for _ in classes]
    for true_class, predicted in zip(true_labels, predicted_labels):
        matrix[row_of[true_class]][column_of[predicted]] += 1

    per_class = {label: matrix[row_of[label]][column_of[label]] / sum(matrix[row_of[label]]) for label in classes}
    correct = sum(matrix[row_of[label]][column_of[label]] for label in classes)
    class_ses = [binomial_se(per_class[label], sum(matrix[row_of[label]])) for label in classes]
    return {
        "task": "scene",
        "n": len(true_labels),
        "unparsable": predicted_labels.count(UNPARSABLE_LABEL),
        "skipped_no_ground_truth": skipped,
        "oa": correct / len(true_labels),
        "oa_se": binomial_se(correct / len(true_labels), len(true_labels)),
        "aa": sum(per_class.values()) / len(per_class),
        "aa_se": mean_of_groups_se(class_ses),
        "per_class": per_class,
        "confusion": {"true_labels": classes, "predicted_labels": column_labels, "matrix": matrix},
    }
