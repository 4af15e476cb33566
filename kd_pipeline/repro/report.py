"""Collect the evaluation files into the results JSON, the tables with standard errors, the verdict and a plot.

Metrics read from each arm's evaluation (``repro.evaluate``), each with its within-seed standard error:

    scene_fc         scene accuracy by forced choice (the primary metric)     aid.fc.oa
    scene_greedy     scene accuracy by greedy generation                     aid.greedy.oa
    vqa_fc, vqa_greedy   VQA mOA (mean of the four type accuracies)           lrben.{fc,greedy}.moa
    caption_rougeL   region-caption ROUGE-L F1 (greedy)                      region_captioning.rougeL
    grounding_miou, grounding_acc50   mean IoU and acc@0.5 (greedy)          referring
    kl_scene, kl_vqa_decision, kl_caption_decision, top1_scene_decision, nll_scene   (eval agreement)

Across seeds a table shows the mean of each arm and the standard error of that mean over seeds; the paired
differences carry their own tests (``stats``).
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
    "kl_caption_decision": (("agreement", "region_captioning", "decision", "kl"), "kl_se"),
    "top1_scene_decision": (("agreement", "aid", "decision", "top1"), "top1_se"),
    "nll_scene": (("agreement", "aid", "all", "nll"), "nll_se"),
}
HEADLINE = ("scene_fc", "vqa_fc", "caption_rougeL")  # the world must leave >= 15 points between baseline and teacher
IMAGE_FREE = {"scene_fc": ("aid", "oa", "oa_se"), "scene_greedy": ("aid", "oa", "oa_se"),
              "vqa_fc": ("lrben", "moa", "moa_se"), "vqa_greedy": ("lrben", "moa", "moa_se"),
              "caption_rougeL": ("region_captioning", "rougeL", "rougeL_se"),
              "grounding_miou": ("referring", "mean_iou", "mean_iou_se"),
              "grounding_acc50": ("referring", "acc@0.5", "acc@0.5_se")}
MIN_GAP = 0.15
TABLE_METRICS = ("scene_fc", "scene_greedy", "vqa_fc", "vqa_greedy", "caption_rougeL", "grounding_miou", "grounding_acc50",
                 "kl_scene")


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
    condition the arms' means over seeds, the paired comparisons per metric, the world checks and the verdict."""
    seeds = sorted(per_seed, key=int)
    summary: dict[str, Any] = {"conditions": {}}
    for condition in conditions:
        rows = [arm for arm in ("teacher", "image_free", *design.ARMS)
                if all(arm in per_seed[seed].get(condition, {}) for seed in seeds)]
        means = {arm: {metric: across_seeds([per_seed[seed][condition][arm][metric]["value"] for seed in seeds],
                                            [per_seed[seed][condition][arm][metric]["se"] for seed in seeds])
                       for metric in METRICS
                       if all(metric in per_seed[seed][condition][arm] for seed in seeds)} for arm in rows}
        tests = {}
        for metric in METRICS:
            arm_values = {arm: [per_seed[seed][condition][arm][metric]["value"] for seed in seeds]
                          for arm in design.ARMS if arm in rows and metric in means[arm]}
            tests[metric] = stats.comparisons(arm_values)
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
        verdict = stats.condition_verdict(tests.get(design.PRIMARY_METRIC, {}), tests.get("kl_scene", {}))
        summary["conditions"][condition] = {"means": means, "comparisons": tests, "world_checks": checks,
                                            "verdict": verdict}
    summary["verdict"] = stats.overall_verdict({name: entry["verdict"]
                                                for name, entry in summary["conditions"].items()})
    # The rule was registered for len(DEFAULT_SEEDS) seeds: with fewer complete the verdict is provisional.
    summary["verdict"]["seeds_planned"] = len(design.DEFAULT_SEEDS)
    summary["verdict"]["final"] = len(seeds) >= len(design.DEFAULT_SEEDS)
    summary["seeds"] = seeds
    return summary


def _percent(metric: str) -> bool:
    return not metric.startswith(("kl_", "nll_"))


def _cell(metric: str, mean: float, se: float | None) -> str:
    scale = 100.0 if _percent(metric) else 1.0
    digits = 1 if _percent(metric) else 3
    return f"{scale * mean:.{digits}f} ± {scale * se:.{digits}f}" if se is not None else f"{scale * mean:.{digits}f}"


def markdown(summary: Mapping[str, Any]) -> str:
    """Per condition: arms x metrics (mean ± SE over seeds, % except KL), then the paired differences."""
    spread = ("mean over seeds ± standard error over seeds" if len(summary["seeds"]) > 1 else
              "the value ± its standard error over the questions (binomial, or per question for ROUGE, IoU and KL)")
    lines = [f"Seeds: {', '.join(summary['seeds'])}. Values: {spread} (percent; KL in nats per token). Paired tests "
             "over seeds: one-sided t (df = seeds - 1; N-A two-sided) and exact sign-flip p.", ""]
    for condition, entry in summary["conditions"].items():
        lines += [f"### Condition `{condition}`", "",
                  "| arm | " + " | ".join(TABLE_METRICS) + " |", "|---|" + "---:|" * len(TABLE_METRICS)]
        for arm, metrics in entry["means"].items():
            cells = [_cell(metric, metrics[metric]["mean"], metrics[metric]["se_over_seeds"]
                           if metrics[metric]["se_over_seeds"] is not None else metrics[metric]["se_within_seed"])
                     if metric in metrics else "–" for metric in TABLE_METRICS]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        lines += ["", "| difference | " + " | ".join(f"{m} (p)" for m in (design.PRIMARY_METRIC, "vqa_fc",
                                                                             "caption_rougeL", "kl_scene")) + " |",
                  "|---|" + "---:|" * 4]
        for comparison in design.COMPARISONS:
            cells = []
            for metric in (design.PRIMARY_METRIC, "vqa_fc", "caption_rougeL", "kl_scene"):
                test = entry["comparisons"].get(metric, {}).get(comparison)
                if test is None:
                    cells.append("–")
                    continue
                p_value = test["p_one_sided"] if comparison != "N-A" else test["p_two_sided"]
                p_text = f"p={p_value:.3f}" if p_value is not None else "p=–"
                cells.append(f"{_cell(metric, test['mean'], test['se'])} ({p_text})")
            lines.append(f"| {comparison} | " + " | ".join(cells) + " |")
        verdict = entry["verdict"]
        checks = ", ".join(f"{metric}: teacher - image-free = {100 * check['gap']:.1f} points"
                           for metric, check in entry["world_checks"].items() if "gap" in check)
        floor = entry["means"].get("image_free", {})
        if "grounding_acc50" in floor:  # grounding is not a headline task at 56 px: its image-free floor is stated
            checks += (f"; grounding floor (image-free phrase lookup): acc@0.5 "
                       f"{100 * floor['grounding_acc50']['mean']:.1f}, mean IoU {100 * floor['grounding_miou']['mean']:.1f}")
        lines += ["", f"World: {checks}.", f"Verdict: harness sensitive = {verdict['harness_sensitive']}; "
                  f"D-C significant = {verdict['d_minus_c_significant']}; KL(D) < KL(C) = {verdict['kl_d_below_c']}; "
                  f"distillation works = {verdict['distillation_works']}; E-F significant = "
                  f"{verdict['e_minus_f_significant']}.", ""]
    overall = summary["verdict"]
    if not overall["final"]:
        lines.append(f"**Interim: {len(summary['seeds'])} of the {overall['seeds_planned']} pre-registered seeds are "
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
    comparisons = list(design.COMPARISONS)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, metric, scale, label in ((axes[0], design.PRIMARY_METRIC, 100.0, "scene accuracy, forced choice (points)"),
                                       (axes[1], "kl_scene", 1.0, "KL(p_T || p_S), scene answers (nats/token)")):
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
