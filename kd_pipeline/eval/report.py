"""Evaluation report: results.json, report.md laid out like the paper's Tables 3-8, and the PNG figures.

Input: {model_name: {benchmark: metrics}}, metrics being the scorers' dicts (fractions in [0, 1]) and, for
"efficiency", `efficiency.efficiency_metrics` (optionally with `latency_s` / `tokens_per_s` from
`measure_generation`). Benchmark keys (case-insensitive): aid, ucmerced (scene), hrben, lrben (vqa), referring
(grounding), region_captioning, efficiency. Unknown keys are kept in results.json and listed in report.md.

report.md has one column per model, values in percent like the paper, "—" where a model lacks a number, and
(by default) the paper's three GeoChat columns for comparison. Figures: `confusion_<model>_<benchmark>.png` for
every scene result with a confusion matrix, and `grounding_examples.png` when grounding answer records and the
image folder are given (if it cannot be drawn, e.g. an image is missing, report.md says why and the tables are
still written).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kd_pipeline.eval.plots import plot_confusion_matrix, plot_grounding_examples

logger = logging.getLogger(__name__)

SCENE_BENCHMARKS = {"aid": "AID", "ucmerced": "UCMerced"}
VQA_BENCHMARKS = {"hrben": "HRBEN", "lrben": "LRBEN"}
KNOWN_BENCHMARKS = (*SCENE_BENCHMARKS, *VQA_BENCHMARKS, "referring", "region_captioning", "efficiency")
BENCHMARK_ALIASES = {
    "uc_merced": "ucmerced", "ucm": "ucmerced", "grounding": "referring", "captioning": "region_captioning",
}
MISSING = "—"

# The paper's GeoChat numbers (Tables 3-8), as fractions like the scorers return, so they render as columns.
PAPER_RESULTS: dict[str, dict[str, dict[str, Any]]] = {
    "GeoChat-7B (paper)": {
        "aid": {"oa": 0.6720, "aa": 0.5588}, "ucmerced": {"oa": 0.8443, "aa": 0.8448},
        "hrben": {"accuracy_by_type": {"presence": 0.5765, "comparison": 0.8084}, "moa": 0.7063},
        "lrben": {"accuracy_by_type": {"presence": 0.9086, "comparison": 0.9025, "rural_urban": 0.9400}},
        "referring": {"acc@0.5": 0.112, "acc@0.25": 0.339},
        "region_captioning": {"rouge1": 0.8664, "rougeL": 0.8659, "meteor": 0.6227},
        "efficiency": {"params_paper": 6760.72e6, "flops_paper_convention": 6904.53e9},
    },
    "GeoChat-13B (paper)": {
        "aid": {"oa": 0.6953, "aa": 0.5659}, "ucmerced": {"oa": 0.9043, "aa": 0.9043},
        "hrben": {"accuracy_by_type": {"presence": 0.5605, "comparison": 0.8302}, "moa": 0.7115},
        "lrben": {"accuracy_by_type": {"presence": 0.9120, "comparison": 0.9175, "rural_urban": 0.9700}},
        "referring": {"acc@0.5": 0.141, "acc@0.25": 0.357},
        "region_captioning": {"rouge1": 0.8710, "rougeL": 0.8705, "meteor": 0.6318},
        "efficiency": {"params_paper": 13048.66e6, "flops_paper_convention": 13377.05e9},
    },
    "Distilled 7B (paper)": {
        "aid": {"oa": 0.6730, "aa": 0.5596}, "ucmerced": {"oa": 0.9124, "aa": 0.9124},
        "hrben": {"accuracy_by_type": {"presence": 0.6003, "comparison": 0.8330}, "moa": 0.7306},
        "lrben": {"accuracy_by_type": {"presence": 0.9191, "comparison": 0.9288, "rural_urban": 0.9500}},
        "referring": {"acc@0.5": 0.144, "acc@0.25": 0.359},
        "region_captioning": {"rouge1": 0.8780, "rougeL": 0.8775, "meteor": 0.6355},
        "efficiency": {"params_paper": 6760.72e6, "flops_paper_convention": 6904.53e9},
    },
}

Getter = Callable[[Mapping[str, Any]], Any]


def normalize_results(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Lowercase benchmark keys and map aliases (UCmerced -> ucmerced, grounding -> referring, ...)."""
    normalised: dict[str, dict[str, dict[str, Any]]] = {}
    for model, benchmarks in results.items():
        normalised[model] = {}
        for benchmark, metrics in benchmarks.items():
            key = benchmark.strip().lower()
            normalised[model][BENCHMARK_ALIASES.get(key, key)] = dict(metrics)
    return normalised


def write_report(
    results: Mapping[str, Mapping[str, Mapping[str, Any]]],
    out_dir: str | Path,
    *,
    include_paper: bool = True,
    grounding_records: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    image_dir: str | Path | None = None,
) -> dict[str, Path]:
    """Write results.json, report.md and the PNG figures into `out_dir`; returns {name: path} of what was written.

    Args:
        results: {model_name: {benchmark: metrics}} (see the module docstring).
        include_paper: add the paper's GeoChat columns to report.md (results.json holds only `results`).
        grounding_records: {model_name: referring answer records} for the grounding figure (needs `image_dir`).
        image_dir: folder of the referring benchmark images.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    normalised = normalize_results(results)
    written = {"results.json": out_dir / "results.json"}
    written["results.json"].write_text(json.dumps(normalised, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    figures: list[Path] = []
    for model, benchmarks in normalised.items():
        for benchmark, label in SCENE_BENCHMARKS.items():
            confusion = benchmarks.get(benchmark, {}).get("confusion")
            if confusion:
                path = out_dir / f"confusion_{_slug(model)}_{benchmark}.png"
                figures.append(plot_confusion_matrix(confusion, path, f"{model}: {label} confusion matrix"))
    figure_problems: list[str] = []
    if grounding_records:
        if image_dir is None:
            figure_problems.append("grounding examples not drawn: no image folder given")
        else:
            try:
                path = out_dir / "grounding_examples.png"
                figures.append(plot_grounding_examples(grounding_records, image_dir, path))
            except (ValueError, OSError) as error:  # a missing image must not cost the tables
                figure_problems.append(f"grounding examples not drawn: {error}")
    for problem in figure_problems:
        logger.warning("%s", problem)
    written.update({path.name: path for path in figures})

    columns = {**normalised, **(PAPER_RESULTS if include_paper else {})}
    markdown = render_markdown(columns, figures, figure_problems)
    written["report.md"] = out_dir / "report.md"
    written["report.md"].write_text(markdown, encoding="utf-8")
    logger.info("report written to %s (%d figures)", out_dir, len(figures))
    return written


def render_markdown(
    columns: Mapping[str, Mapping[str, Mapping[str, Any]]],
    figures: Sequence[Path] = (),
    figure_problems: Sequence[str] = (),
) -> str:
    """report.md text: Tables 3-8 with one column per entry of `columns`, then coverage, figures and why any
    figure is missing."""
    names = list(columns)
    percent = _percent
    sections = ["# GeoChat evaluation report", "", "Values in percent unless stated; — = not evaluated.", ""]

    sections += _table("Table 3: zero-shot scene classification OA (%)", names, columns, [
        (label, benchmark, _get("oa"), percent) for benchmark, label in SCENE_BENCHMARKS.items()])
    sections += _table("Table 4: zero-shot scene classification AA (%)", names, columns, [
        (label, benchmark, _get("aa"), percent) for benchmark, label in SCENE_BENCHMARKS.items()])

    vqa_rows = []
    for benchmark, label in VQA_BENCHMARKS.items():
        types = ["presence", "comparison"] + (["rural_urban"] if benchmark == "lrben" else [])
        types += sorted({name for metrics in columns.values()
                         for name in metrics.get(benchmark, {}).get("accuracy_by_type", {}) if name not in types})
        vqa_rows += [(f"{label} {name}", benchmark, _get("accuracy_by_type", name), percent) for name in types]
        vqa_rows += [(f"{label} mOA (mean of types)", benchmark, _get("moa"), percent),
                     (f"{label} OA (all questions)", benchmark, _get("oa"), percent)]
    sections += _table("Table 5: RSVQA accuracy (%)", names, columns, vqa_rows, note=(
        "The paper's HRBEN mOA equals the sample-weighted accuracy of its two types (the mean of 57.65 and 80.84 "
        "would be 69.25), so compare it with the OA row as well."))

    size_groups = sorted({group for metrics in columns.values()
                          for group in metrics.get("referring", {}).get("by_size_group", {})})
    grounding_rows = [("acc@0.5", "referring", _get("acc@0.5"), percent),
                      ("acc@0.25", "referring", _get("acc@0.25"), percent)]
    grounding_rows += [(f"acc@0.5 ({group})", "referring", _get("by_size_group", group, "acc@0.5"), percent)
                       for group in size_groups]
    sections += _table("Table 6: visual grounding (%)", names, columns, grounding_rows)

    meteor_notes = [_meteor_source(name, metrics["region_captioning"]) for name, metrics in columns.items()
                    if "n" in metrics.get("region_captioning", {})]
    sections += _table("Table 7: region-level captioning (%)", names, columns, [
        ("ROUGE-1", "region_captioning", _get("rouge1"), percent),
        ("ROUGE-L", "region_captioning", _get("rougeL"), percent),
        ("METEOR", "region_captioning", _get("meteor"), percent),
    ], note=f"METEOR backend: {'; '.join(meteor_notes)}." if meteor_notes else "")

    sections += _table("Table 8: parameters and FLOPs", names, columns, [
        ("Params (M), paper's count", "efficiency", _get("params_paper"), _scaled(1e6)),
        ("Params (M), total", "efficiency", _get("params_total"), _scaled(1e6)),
        ("FLOPs (G), paper convention", "efficiency", _get("flops_paper_convention"), _scaled(1e9)),
        ("FLOPs (G), 1 image + prompt", "efficiency", _get("flops_forward_matmul"), _scaled(1e9)),
        ("Generation latency (s)", "efficiency", _get("latency_s"), _scaled(1.0)),
        ("Generation tokens/s", "efficiency", _get("tokens_per_s"), _scaled(1.0)),
    ], note=("Paper's count: LLM + projector + vision position table. Paper convention: one text-only forward of "
             "512 tokens, 2 FLOPs per multiply-accumulate, matmuls only (reproduces Table 8 to 0.02%)."))

    coverage_rows = [(benchmark, benchmark, _coverage, str) for benchmark in KNOWN_BENCHMARKS[:-1]]
    sections += _table("Coverage: scored records / unparsable answers", names, columns, coverage_rows)
    unknown = sorted({key for metrics in columns.values() for key in metrics if key not in KNOWN_BENCHMARKS})
    if unknown:
        sections += [f"Other results (in results.json only): {', '.join(unknown)}", ""]
    if figures or figure_problems:
        sections += ["## Figures", ""] + [f"![{path.stem}]({path.name})" for path in figures]
        sections += [f"- {problem}" for problem in figure_problems] + [""]
    return "\n".join(sections)


def _table(
    title: str,
    names: Sequence[str],
    columns: Mapping[str, Mapping[str, Mapping[str, Any]]],
    rows: Sequence[tuple[str, str, Getter, Callable[[Any], str]]],
    note: str = "",
) -> list[str]:
    lines = [f"## {title}", "", "| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for label, benchmark, getter, formatter in rows:
        cells = []
        for name in names:
            metrics = columns[name].get(benchmark)
            value = getter(metrics) if metrics else None
            cells.append(formatter(value) if value is not None else MISSING)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + (["", note] if note else []) + [""]


def _get(*keys: str) -> Getter:
    def getter(metrics: Mapping[str, Any]) -> Any:
        value: Any = metrics
        for key in keys:
            if not isinstance(value, Mapping) or key not in value:
                return None
            value = value[key]
        return value

    return getter


def _meteor_source(name: str, captioning: Mapping[str, Any]) -> str:
    backend = captioning.get("meteor_backend")
    if backend:
        return f"{name}: {backend}"
    return f"{name}: unavailable ({captioning.get('meteor_note', 'no reason given')})"


def _coverage(metrics: Mapping[str, Any]) -> str | None:
    if "n" not in metrics:
        return None
    return f"{metrics['n']} / {metrics.get('unparsable', 0)}"


def _percent(value: Any) -> str:
    return f"{100.0 * float(value):.2f}"


def _scaled(unit: float) -> Callable[[Any], str]:
    return lambda value: f"{float(value) / unit:.2f}"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or "model"
