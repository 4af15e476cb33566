"""Collect the evaluation files into the results JSON, the tables with standard errors, the verdict and a plot.

Metrics read from each arm's evaluation (``repro.evaluate``), each with its within-seed standard error:

    scene_fc         scene accuracy by forced choice (the primary metric)     aid.fc.oa
    vqa_fc           VQA mOA by forced choice (mean of the type accuracies)   lrben.fc.moa
    caption_rougeL   region-caption ROUGE-L F1 (greedy)                      region_captioning.rougeL
    kl_scene, kl_vqa_decision, top1_scene_decision, nll_scene   (eval agreement)
    scene_greedy, vqa_greedy, grounding_miou, grounding_acc50   only when evaluated (``--greedy-tasks``; design 1)

Across seeds a table shows the mean of each arm and the standard error of that mean over seeds; the paired
differences carry their own tests (``stats``), and the verdict applies ``design.pass_rule_text``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kd_pipeline.repro import design, stats

METRICS: dict[str, tuple[tuple[str, ...], str]] = {
    "scene_fc": (("aid", "fc", "oa"), "oa_se"),
    "scene_greedy": (("aid", "greedy", "oa"), "oa_se"),
    "vqa_fc": (("lrben", "fc", "moa"), "moa_se"),
    "vqa_greedy": (("lrben", "greedy", "moa"), "moa_se"),
    "caption_rougeL": (("region_captioning", "rougeL"), "rougeL_se"),
    "grounding_miou": (("referring", "mean_iou"), "mean_iou_se"),
    "grounding_acc50": (("referring", "acc@0.5"), "acc@0.5_se"),
    "kl_scene": (("agreement", "aid", "all", "kl"), "kl_se"),
    "kl_vqa_decision": (("agreement", "lrben", "decision", "kl"), "kl_se"),
    "top1_scene_decision": (("agreement", "aid", "decision", "top1"), "top1_se"),
    "nll_scene": (("agreement", "aid", "all", "nll"), "nll_se"),
}
"""Every metric an evaluation file may hold (design 2 writes no greedy scene/VQA and no grounding: ``evaluate``)."""
HEADLINE = ("scene_fc", "vqa_fc", "caption_rougeL")  # the world must leave >= 15 points between baseline and teacher
IMAGE_FREE = {"scene_fc": ("aid", "oa", "oa_se"), "scene_greedy": ("aid", "oa", "oa_se"),
              "vqa_fc": ("lrben", "moa", "moa_se"), "vqa_greedy": ("lrben", "moa", "moa_se"),
              "caption_rougeL": ("region_captioning", "rougeL", "rougeL_se"),
              "grounding_miou": ("referring", "mean_iou", "mean_iou_se"),
              "grounding_acc50": ("referring", "acc@0.5", "acc@0.5_se")}
MIN_GAP = 0.15
TABLE_METRICS = ("scene_fc", "vqa_fc", "caption_rougeL", "kl_scene", "top1_scene_decision")
DIFFERENCE_METRICS = (design.PRIMARY_METRIC, "vqa_fc", "caption_rougeL", design.KL_METRIC)


def extract(evaluation: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """{metric: {"value", "se"}} of one evaluation file (metrics it lacks are left out)."""
    values = {}
    for name, (path, se_key) in METRICS.items():
        node: Any = evaluation
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, Mapping) else None
        if isinstance(node, Mapping) and node.get(path[-1]) is not None:
            values[name] = {"value": float(node[path[-1]]), "se": _number(node.get(se_key))}
    return values


def extract_image_free(scores: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    return {name: {"value": float(scores[task][key]), "se": _number(scores[task].get(se_key))}
            for name, (task, key, se_key) in IMAGE_FREE.items() if task in scores}


def _number(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def across_seeds(values: Sequence[float], within_ses: Sequence[float | None] = ()) -> dict[str, float | None]:
    """Mean over seeds with the SE over seeds; with one seed (the demo) the SE is that seed's own (binomial /
    per-question) standard error, ``se_within_seed``."""
    count = len(values)
    mean = sum(values) / count
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (count - 1) / count) if count > 1 else None
    known = [value for value in within_ses if value is not None]
    within = math.sqrt(sum(value * value for value in known)) / len(known) if known else None
    return {"mean": mean, "se_over_seeds": se, "se_within_seed": within, "n_seeds": count}


def summarise(per_seed: Mapping[str, Mapping[str, Mapping[str, dict]]], conditions: Sequence[str]) -> dict:
    """From {seed: {condition: {arm (+ teacher, image_free): {metric: {value, se}}}}} to the summary: per
    condition the arms' means over seeds, the paired comparisons per metric, the world checks, the verdict and (in
    ``unlabelled``) the recovered share."""
    seeds = sorted(per_seed, key=int)
    summary: dict[str, Any] = {"conditions": {}}
    for condition in conditions:
        rows = [arm for arm in ("teacher", "image_free", *design.condition_arms(condition))
                if all(arm in per_seed[seed].get(condition, {}) for seed in seeds)]
        means = {arm: {metric: across_seeds([per_seed[seed][condition][arm][metric]["value"] for seed in seeds],
                                            [per_seed[seed][condition][arm][metric]["se"] for seed in seeds])
                       for metric in METRICS
                       if all(metric in per_seed[seed][condition][arm] for seed in seeds)} for arm in rows}
        tests = {}
        for metric in METRICS:
            arm_values = {arm: [per_seed[seed][condition][arm][metric]["value"] for seed in seeds]
                          for arm in design.ARMS if arm in rows and metric in means[arm]}
            tests[metric] = stats.comparisons(arm_values, design.condition_comparisons(condition))
        checks = {}
        for metric in HEADLINE:
            if metric in means.get("teacher", {}) and metric in means.get("image_free", {}):
                gap = means["teacher"][metric]["mean"] - means["image_free"][metric]["mean"]
                checks[metric] = {"teacher": means["teacher"][metric]["mean"],
                                  "image_free": means["image_free"][metric]["mean"], "gap": gap,
                                  "gap_at_least_15_points": gap >= MIN_GAP}
            if metric in means.get("teacher", {}) and metric in means.get("A", {}):
                checks.setdefault(metric, {})["teacher_minus_A"] = (means["teacher"][metric]["mean"]
                                                                    - means["A"][metric]["mean"])
        verdict = stats.condition_verdict(tests.get(design.PRIMARY_METRIC, {}), tests.get(design.KL_METRIC, {}))
        summary["conditions"][condition] = {"means": means, "comparisons": tests, "world_checks": checks,
                                            "verdict": verdict}
        numerator, denominator, share_condition = design.RECOVERED_SHARE
        primary = tests.get(design.PRIMARY_METRIC, {})
        if condition == share_condition and numerator in primary and denominator in primary:
            share = stats.fieller_ratio(primary[numerator]["differences"], primary[denominator]["differences"])
            share["goal"] = design.RECOVERED_SHARE_GOAL
            summary["conditions"][condition]["recovered_share"] = share
    summary["verdict"] = stats.overall_verdict({name: entry["verdict"]
                                                for name, entry in summary["conditions"].items()})
    # The rule was registered for DEFAULT_SEEDS: until all of them are complete the verdict is provisional, and on
    # other seeds only (the demo's seed 0) it is an illustration of the rule, not the experiment's answer.
    summary["verdict"]["seeds_planned"] = len(design.DEFAULT_SEEDS)
    summary["verdict"]["final"] = _registered(seeds) == len(design.DEFAULT_SEEDS)
    summary["seeds"] = seeds
    return summary


def _registered(seeds: Sequence[str]) -> int:
    """How many of ``seeds`` are the design's pre-registered ones."""
    return sum(int(seed) in design.DEFAULT_SEEDS for seed in seeds)


def _percent(metric: str) -> bool:
    return not metric.startswith(("kl_", "nll_"))


def _cell(metric: str, mean: float, se: float | None) -> str:
    scale = 100.0 if _percent(metric) else 1.0
    digits = 1 if _percent(metric) else 3
    return f"{scale * mean:.{digits}f} ± {scale * se:.{digits}f}" if se is not None else f"{scale * mean:.{digits}f}"


def _difference_cell(metric: str, test: Mapping[str, Any], comparison: str, means: Mapping[str, Any]) -> str:
    """mean ± SE (p) of a paired difference; with one seed the SE is that of the two arms' question-level SEs
    combined as if independent (conservative: the arms answer the same questions) and there is no p."""
    treatment, control = design.COMPARISONS[comparison]
    se = test["se"]
    if se is None and test["n"] == 1:
        parts = [means[arm][metric]["se_within_seed"] for arm in (treatment, control)]
        se = math.sqrt(sum(part * part for part in parts)) if None not in parts else None
    p_value = test["p_two_sided"] if comparison == design.NEGATIVE else test["p_one_sided"]
    return f"{_cell(metric, test['mean'], se)} (p={f'{p_value:.3f}' if p_value is not None else '–'})"


def _verdict_line(verdict: Mapping[str, Any]) -> str:
    tests = "; ".join(f"{name}: Holm p = {test['p_holm']:.3f}" if test["p_holm"] is not None else f"{name}: no p"
                      for name, test in verdict["tests"].items())
    kl = "; ".join(f"KL below its control's for {name.split('-')[0]} = {test['kl_below_control']}"
                   for name, test in verdict["tests"].items())
    return (f"Verdict: harness sensitive = {verdict['harness_sensitive']}; {tests}; {kl}; distillation works = "
            f"{verdict['distillation_works']}" + (f" (by {', '.join(verdict['works_by'])})" if verdict["works_by"]
                                                  else "") + ".")


def _share_line(share: Mapping[str, Any]) -> str:
    if share["ratio"] is None:
        return "Recovered share (E-F)/(Pc-C): undefined (Pc-C is 0)."
    interval = (f"{share['level']:.0%} Fieller interval {100 * share['low']:.0f} % to {100 * share['high']:.0f} %"
                if share["bounded"] else f"{share['level']:.0%} Fieller interval unbounded (Pc-C not resolved)")
    return (f"Recovered share of the labels' gain, (E-F)/(Pc-C): {100 * share['ratio']:.0f} % ({interval}; goal "
            f">= {100 * share['goal']:.0f} %).")


def markdown(summary: Mapping[str, Any]) -> str:
    """Per condition: arms x metrics (mean ± SE over seeds, % except KL), the paired differences, the verdict."""
    one_seed = len(summary["seeds"]) == 1
    spread = ("the value ± its standard error over the questions (binomial, or per question for ROUGE and KL); "
              "differences ± the two arms' standard errors combined, with no p-value (one seed)" if one_seed else
              "mean over seeds ± standard error over seeds")
    lines = [f"Seeds: {', '.join(summary['seeds'])}. Values: {spread} (percent; KL in nats per token). Paired tests "
             f"over seeds: one-sided t (df = seeds - 1; {design.NEGATIVE} two-sided).", ""]
    for condition, entry in summary["conditions"].items():
        lines += [f"### Condition `{condition}`", "",
                  "| arm | " + " | ".join(TABLE_METRICS) + " |", "|---|" + "---:|" * len(TABLE_METRICS)]
        for arm, metrics in entry["means"].items():
            cells = [_cell(metric, metrics[metric]["mean"], metrics[metric]["se_over_seeds"]
                           if metrics[metric]["se_over_seeds"] is not None else metrics[metric]["se_within_seed"])
                     if metric in metrics else "–" for metric in TABLE_METRICS]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        lines += ["", "| difference | " + " | ".join(f"{metric} (p)" for metric in DIFFERENCE_METRICS) + " |",
                  "|---|" + "---:|" * len(DIFFERENCE_METRICS)]
        for comparison in design.condition_comparisons(condition):
            cells = [_difference_cell(metric, test, comparison, entry["means"])
                     if (test := entry["comparisons"].get(metric, {}).get(comparison)) is not None else "–"
                     for metric in DIFFERENCE_METRICS]
            if any(cell != "–" for cell in cells):
                lines.append(f"| {comparison} | " + " | ".join(cells) + " |")
        checks = ", ".join(f"{metric}: teacher - image-free = {100 * check['gap']:.1f} points"
                           for metric, check in entry["world_checks"].items() if "gap" in check)
        lines += ["", f"World: {checks}.", _verdict_line(entry["verdict"])]
        if "recovered_share" in entry:
            lines.append(_share_line(entry["recovered_share"]))
        lines.append("")
    overall = summary["verdict"]
    registered = _registered(summary["seeds"])
    if not overall["final"] and registered == 0:
        lines.append(f"**Not the experiment: seed(s) {', '.join(map(str, summary['seeds']))} are not among its "
                     f"pre-registered seeds {', '.join(map(str, design.DEFAULT_SEEDS))}; this verdict only shows the "
                     "rule at work.**")
    elif not overall["final"]:
        lines.append(f"**Interim: {registered} of the {overall['seeds_planned']} pre-registered seeds are "
                     "complete; the rule is judged on all of them, so this verdict is provisional.**")
    lines.append(f"**Pass rule: {'HOLDS' if overall['rule_holds'] else 'does NOT hold'}** "
                 f"(holds in: {', '.join(overall['holds_in']) or 'no condition'}; harness sensitive in: "
                 f"{', '.join(overall['harness_sensitive_in']) or 'no condition'}). Rule: {design.pass_rule_text()}")
    return "\n".join(lines)


def plot(summary: Mapping[str, Any], path: Path) -> None:
    """Paired differences (mean ± SE over seeds) of the primary metric and of KL, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conditions = list(summary["conditions"])
    comparisons = [name for name in design.COMPARISONS
                   if any(name in entry["comparisons"].get(design.PRIMARY_METRIC, {})
                          for entry in summary["conditions"].values())]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, metric, scale, label in ((axes[0], design.PRIMARY_METRIC, 100.0, "scene accuracy, forced choice (points)"),
                                       (axes[1], design.KL_METRIC, 1.0, "KL(p_T || p_S), scene answers (nats/token)")):
        width = 0.8 / max(len(conditions), 1)
        for index, condition in enumerate(conditions):
            tests = summary["conditions"][condition]["comparisons"].get(metric, {})
            xs = [position + index * width for position, name in enumerate(comparisons) if name in tests]
            means = [scale * tests[name]["mean"] for name in comparisons if name in tests]
            errors = [scale * (tests[name]["se"] or 0.0) for name in comparisons if name in tests]
            axis.bar(xs, means, width, yerr=errors, capsize=3, label=condition)
        axis.axhline(0.0, color="black", linewidth=0.8)
        axis.set_xticks([position + width * (len(conditions) - 1) / 2 for position in range(len(comparisons))])
        axis.set_xticklabels(comparisons)
        axis.set_ylabel(label)
    axes[0].legend()
    figure.suptitle("Paired differences over seeds (mean ± SE)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_results(path: Path, payload: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(payload, indent=1, default=float))
    temporary.replace(path)
