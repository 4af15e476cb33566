"""The models of one condition on their world's benchmark: ``python -m kd_pipeline.repro.evaluate``.

    python -m kd_pipeline.repro.evaluate --bench BENCH_DIR --out-dir EVAL_DIR --model NAME=DIR [--model ...] \
        [--teacher TEACHER_DIR --agreement-questions 300] [--max-new-tokens 32]

Models are evaluated one after another in one process (start-up is paid once) and each result is written to
``EVAL_DIR/<NAME>.json`` atomically as soon as it is done; a model whose file exists is skipped, so an interrupted
evaluation continues. Per task of a ``data_prep bench`` folder (aid = scene, lrben = VQA, region_captioning;
referring with ``--greedy-tasks``):
- scene and VQA by forced choice (``eval.likelihood``; the closed set is every ground-truth answer of the task, per
  question type for VQA), scored by the project's scorers; ``--greedy-tasks aid,lrben`` adds greedy generation (in
  design 1 greedy equalled forced choice within 0.1 point for every arm, so design 2 leaves it out);
- region captions by greedy generation (``eval.generate``);
- with ``--teacher``, ``eval.agreement`` (student NLL, KL(p_T||p_S), top-1 agreement) on the first
  ``--agreement-questions`` answers of scene and VQA (not for the teacher itself).
Every number carries its standard error (``eval.uncertainty``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kd_pipeline.eval.agreement import TASK_KINDS, task_agreement
from kd_pipeline.eval.captioning import score_region_captioning
from kd_pipeline.eval.generate import free_eval_model, generate_answers, load_eval_model, load_pixels, select_device
from kd_pipeline.eval.likelihood import forced_choice
from kd_pipeline.eval.records import read_jsonl
from kd_pipeline.eval.referring import score_referring
from kd_pipeline.eval.scene import score_scene
from kd_pipeline.eval.vqa import score_vqa

logger = logging.getLogger("kd_pipeline.repro.evaluate")

BATCH = 64
SHORT_ANSWER_TOKENS = 8  # greedy length for scene and VQA answers (a class name, Yes/No, a count)
AGREEMENT_TASKS = ("aid", "lrben")
EFFICIENCY_TEXT_TOKENS = 64  # Table 8's input: one image + 64 text tokens


def candidate_sets(questions: Sequence[dict], by_type: bool) -> list[list[str]]:
    """The closed answer set of each question: every ground truth of the task (of its type with ``by_type``)."""
    pools: dict[Any, set[str]] = defaultdict(set)
    for question in questions:
        pools[question.get("type") if by_type else None].add(str(question["ground_truth"]))
    return [sorted(pools[question.get("type") if by_type else None]) for question in questions]


def answer_all(eval_model, questions: Sequence[dict], image_dir: Path, max_new_tokens: int,
               candidates: Sequence[Sequence[str]] | None = None) -> list[dict]:
    """Answer records (question fields + ``answer``) by greedy generation, or by forced choice with ``candidates``."""
    records = []
    for start in range(0, len(questions), BATCH):
        batch = questions[start:start + BATCH]
        pixels = load_pixels([image_dir / question["image"] for question in batch], eval_model.image_size)
        prompts = [question["prompt"] for question in batch]
        if candidates is None:
            answers = generate_answers(eval_model, prompts, pixels, max_new_tokens)
        else:
            answers = [choice.answer for choice in
                       forced_choice(eval_model, prompts, pixels, candidates[start:start + BATCH])]
        records.extend({**question, "answer": answer} for question, answer in zip(batch, answers))
    return records


def evaluate(model, bench: dict[str, list[dict]], image_dir: Path, teacher, agreement_questions: int,
             max_new_tokens: int, greedy_tasks: Sequence[str] = ()) -> dict:
    """Every metric of one loaded model (``teacher`` loaded too, or None for no agreement); ``greedy_tasks`` of aid,
    lrben and referring are also answered by greedy generation."""
    from kd_pipeline.eval.efficiency import efficiency_metrics

    table8 = efficiency_metrics(model.model, model.model.config, EFFICIENCY_TEXT_TOKENS)
    results: dict[str, Any] = {"efficiency": {key: table8[key] for key in ("params_paper", "params_total",
                                                                          "flops_forward_matmul")}}
    with torch.inference_mode():
        for task, scorer, by_type in (("aid", score_scene, False), ("lrben", score_vqa, True)):
            if task in bench:
                questions = bench[task]
                results[task] = {"fc": scorer(answer_all(model, questions, image_dir, 0,
                                                         candidate_sets(questions, by_type)))}
                if task in greedy_tasks:
                    results[task]["greedy"] = scorer(answer_all(model, questions, image_dir, SHORT_ANSWER_TOKENS))
        if "region_captioning" in bench:
            records = answer_all(model, bench["region_captioning"], image_dir, max_new_tokens)
            results["region_captioning"] = score_region_captioning(records, meteor="off")
        if "referring" in bench and "referring" in greedy_tasks:
            results["referring"] = score_referring(answer_all(model, bench["referring"], image_dir, max_new_tokens))
        if teacher is not None:
            results["agreement"] = {task: task_agreement(teacher, model, bench[task][:agreement_questions], image_dir,
                                                         TASK_KINDS[task]) for task in AGREEMENT_TASKS if task in bench}
    return results


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(payload, indent=1))
    os.replace(temporary, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kd_pipeline.repro.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench", required=True, type=Path, help="data_prep bench output folder")
    parser.add_argument("--out-dir", required=True, type=Path, help="folder for <NAME>.json results")
    parser.add_argument("--model", action="append", required=True, metavar="NAME=DIR", help="exported model (repeat)")
    parser.add_argument("--teacher", type=Path, default=None, help="teacher folder for eval agreement")
    parser.add_argument("--agreement-questions", type=int, default=300, help="answers per task for agreement")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="greedy length of captions and boxes")
    parser.add_argument("--greedy-tasks", default="", help="comma-separated aid, lrben, referring: also answered by "
                                                          "greedy generation (default: none)")
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    models = dict(spec.split("=", 1) for spec in options.model if "=" in spec)
    missing = [str(folder) for folder in [options.bench, *map(Path, models.values())] +
               ([options.teacher] if options.teacher else []) if not Path(folder).is_dir()]
    if missing or len(models) != len(options.model):
        print(f"error: give --model as NAME=DIR; these folders do not exist: {', '.join(missing) or '-'}",
              file=sys.stderr)
        return 2
    device, dtype = select_device("auto")
    bench = {task: read_jsonl(options.bench / f"{task}.jsonl") for task in ("aid", "lrben", "region_captioning",
                                                                            "referring")
             if (options.bench / f"{task}.jsonl").is_file()}
    teacher = None
    for name, folder in models.items():
        out = options.out_dir / f"{name}.json"
        if out.is_file():
            logger.info("%s: %s exists, skipped", name, out)
            continue
        if options.teacher is not None and teacher is None:
            teacher = load_eval_model(options.teacher, device, dtype)
        model = load_eval_model(Path(folder), device, dtype)
        same = options.teacher is not None and Path(folder).resolve() == options.teacher.resolve()
        write_json(out, evaluate(model, bench, options.bench / "images", None if same else teacher,
                                 options.agreement_questions, options.max_new_tokens,
                                 tuple(filter(None, options.greedy_tasks.split(",")))))
        free_eval_model(model)
        logger.info("%s evaluated: %s", name, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
