"""Evaluation on GeoChat-Bench: scorers, report, figures and efficiency numbers.

Modules, one concern each:
    records     answer/question jsonl, field-name variants, joins, answer checks
    scene       scene classification OA / AA / per class / confusion matrix
    vqa         RSVQA accuracy per question type, mOA
    boxes       GeoChat box text, rotated polygons, IoU and matching
    referring   grounding acc@0.5 / acc@0.25 overall, by type and size group
    captioning  ROUGE-1 / ROUGE-L / METEOR for region captions
    images      finding, sizing and safely opening benchmark images
    plots       confusion-matrix and grounding-example PNGs
    report      results.json and report.md (paper Tables 3-8)
    efficiency  parameter counts, analytic FLOPs, generation timing
Command line: `python -m kd_pipeline.eval --help`.
"""

from kd_pipeline.eval.captioning import score_region_captioning
from kd_pipeline.eval.referring import score_referring
from kd_pipeline.eval.scene import score_scene
from kd_pipeline.eval.vqa import score_vqa

__all__ = ["score_region_captioning", "score_referring", "score_scene", "score_vqa"]
