"""Remote-sensing VQA scores (RSVQA-HRBEN and -LRBEN; paper Table 5).

Rule: exact match of answer and ground truth after the scene rule's normalisation (lowercase, whitespace and
periods removed). Question types are normalised: "comp" -> "comparison", "rural/urban" and "ruralurban" ->
"rural_urban"; other type names are lowercased and kept; a record with no type goes to "unspecified".

Metrics (fractions in [0, 1]):
- accuracy_by_type: accuracy of each question type present (presence, comparison, rural_urban, count, ...);
- moa: mean of the per-type accuracies (the brief's mOA);
- oa: accuracy over all records. GeoChat's HRBEN "mOA" column (e.g. 70.63 for presence 57.65 / comparison
  80.84) is this sample-weighted figure, not the mean over types: both are reported;
- n_by_type, n; unparsable: answers that are missing, blank, over-long, or (after normalisation) none of: a
  ground-truth answer seen in the file, one of RSVQA's closed answers (yes, no, rural, urban), a number;
  skipped_no_ground_truth.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from kd_pipeline.eval.records import answer_text, normalize_label, split_missing_ground_truth
from kd_pipeline.eval.uncertainty import binomial_se, mean_of_groups_se

TYPE_ALIASES = {
    "comp": "comparison",
    "comparison": "comparison",
    "presence": "presence",
    "rural_urban": "rural_urban",
    "rural/urban": "rural_urban",
    "ruralurban": "rural_urban",
    "count": "count",
}
UNSPECIFIED_TYPE = "unspecified"
# RSVQA's closed answer sets; a small file may not show both answers of a type among its ground truths.
CLOSED_ANSWERS = frozenset({"yes", "no", "rural", "urban"})


def question_type(record: Mapping[str, Any]) -> str:
    """The normalised question type of a canonical record (see the module docstring)."""
    raw_type = record.get("type")
    if not isinstance(raw_type, str) or not raw_type.strip():
        return UNSPECIFIED_TYPE
    name = raw_type.strip().lower()
    return TYPE_ALIASES.get(name, name)


def score_vqa(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Score VQA answer records; see the module docstring for the rule and the metrics.

    Raises:
        ValueError: no record carries a ground truth (pass the question file to join it).
    """
    scored, skipped = split_missing_ground_truth(records, "vqa")
    types = [question_type(record) for record in scored]
    truths = [normalize_label(str(record["ground_truth"])) for record in scored]
    vocabulary = CLOSED_ANSWERS | set(truths)

    correct_by_type: dict[str, int] = defaultdict(int)
    n_by_type: dict[str, int] = defaultdict(int)
    unparsable = 0
    for record, record_type, truth in zip(scored, types, truths):
        n_by_type[record_type] += 1
        answer = answer_text(record)
        predicted = normalize_label(answer) if answer is not None else None
        if predicted is None or (predicted not in vocabulary and not predicted.isdigit()):
            unparsable += 1
        if predicted == truth:
            correct_by_type[record_type] += 1

    accuracy_by_type = {name: correct_by_type[name] / n_by_type[name] for name in sorted(n_by_type)}
    se_by_type = {name: binomial_se(accuracy_by_type[name], n_by_type[name]) for name in accuracy_by_type}
    overall = sum(correct_by_type.values()) / len(scored)
    return {
        "task": "vqa",
        "n": len(scored),
        "unparsable": unparsable,
        "skipped_no_ground_truth": skipped,
        "oa": overall,
        "oa_se": binomial_se(overall, len(scored)),
        "moa": sum(accuracy_by_type.values()) / len(accuracy_by_type),
        "moa_se": mean_of_groups_se(list(se_by_type.values())),
        "accuracy_by_type": accuracy_by_type,
        "se_by_type": se_by_type,
        "n_by_type": dict(sorted(n_by_type.items())),
    }
