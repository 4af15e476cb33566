"""``python -m kd_pipeline.eval agreement``: how close a student's answer-token distributions are to its teacher's.

Runbook::

    python -m kd_pipeline.eval agreement --teacher models/teacher --student models/distilled --data evalsets \\
        [--tasks aid,lrben,region_captioning] [--limit 300] [--json]

On held-out questions with their ground-truth answers (a ``data_prep bench`` folder), both models read the same
teacher-forced sequence (evaluation prompt + answer + ``</s>``, ``likelihood.answer_sequence``) and at every answer
position we measure

- ``nll``: the student's negative log-likelihood of the ground-truth token (nats per token);
- ``kl``: KL(p_T || p_S) = sum_v p_T(v) (log p_T(v) - log p_S(v)), the quantity stage 1 minimises;
- ``top1``: whether the student's most likely token is the teacher's;
- ``teacher_nll``: the same NLL under the teacher, for reference.

Each is reported over all answer tokens and over **decision tokens**: the token that decides a closed answer (the
first answer token of scene and VQA answers: the class name's first piece, Yes/No, the count, rural/urban) and,
in captions, the first piece of the first colour word. These per-token diagnostics need far fewer questions than
accuracy to show whether a stage moved the student toward the teacher.

Standard errors treat the question as the unit (``uncertainty.ratio_se``): tokens of one answer are not
independent. Teacher and student must share the tokenizer (same vocabulary), as distillation requires.
Exit status: 0, or 2 on bad input (missing folders or task files, different vocabularies).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kd_pipeline.eval.generate import load_eval_model, load_pixels, select_device
from kd_pipeline.eval.likelihood import AnswerSequence, answer_token_logits, answer_sequence
from kd_pipeline.eval.records import read_jsonl
from kd_pipeline.eval.uncertainty import ratio_se

logger = logging.getLogger(__name__)

TASK_KINDS = {"aid": "scene", "ucmerced": "scene", "lrben": "vqa", "hrben": "vqa", "region_captioning": "caption",
              "referring": "referring"}
COLOUR_WORDS = ("white", "grey", "gray", "red", "blue", "black", "yellow", "orange", "green", "brown", "silver")
METRICS = ("nll", "kl", "top1", "teacher_nll")


@dataclass
class Accumulator:
    """Per-question sums and token counts of each metric, for ratio means with question-level SEs."""
    sums: dict[str, list[float]] = field(default_factory=lambda: {name: [] for name in METRICS})
    counts: list[float] = field(default_factory=list)

    def add(self, values: dict[str, torch.Tensor]) -> None:
        """``values``: metric -> (n_tokens,) tensor of one question's tokens (n_tokens may be 0)."""
        count = next(iter(values.values())).numel()
        if count == 0:
            return
        self.counts.append(float(count))
        for name in METRICS:
            self.sums[name].append(float(values[name].double().sum()))

    def summary(self) -> dict[str, float]:
        total = sum(self.counts)
        result: dict[str, float] = {"questions": len(self.counts), "tokens": total}
        for name in METRICS:
            result[name] = sum(self.sums[name]) / total if total else float("nan")
            result[f"{name}_se"] = ratio_se(self.sums[name], self.counts)
        return result


def decision_index(question: str, answer: str, kind: str, tokenizer, image_token_id: int,
                   num_image_tokens: int) -> int | None:
    """Index, among the answer's labelled tokens, of its decision token (module doc), or None when it has none."""
    if kind in ("scene", "vqa"):
        return 0
    if kind != "caption":
        return None
    words = answer.split()
    position = next((index for index, word in enumerate(words) if word.strip(",.").lower() in COLOUR_WORDS), None)
    if position is None:
        return None
    if position == 0:
        return 0
    prefix = answer_sequence(question, " ".join(words[:position]), tokenizer, image_token_id, num_image_tokens)
    return sum(label != -100 for label in prefix.labels) - 1  # the prefix's answer tokens, without its </s>


def token_metrics(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                  targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token metrics from (N, V) logits of both models at the same positions, in fp64 (module doc)."""
    teacher_logprob = torch.log_softmax(teacher_logits.double(), dim=-1)  # (N, V)
    student_logprob = torch.log_softmax(student_logits.double(), dim=-1)  # (N, V)
    kl = (teacher_logprob.exp() * (teacher_logprob - student_logprob)).sum(-1)  # (N,)
    return {"nll": -student_logprob.gather(-1, targets[:, None]).squeeze(-1),
            "kl": kl,
            "top1": (teacher_logprob.argmax(-1) == student_logprob.argmax(-1)).double(),
            "teacher_nll": -teacher_logprob.gather(-1, targets[:, None]).squeeze(-1)}


def task_agreement(teacher, student, questions: Sequence[dict], image_dir: Path, kind: str,
                   batch_size: int = 32) -> dict[str, dict[str, float]]:
    """{"all": summary, "decision": summary} over ``questions`` (normalized bench records with ground truths)."""
    if len(teacher.tokenizer) != len(student.tokenizer):
        raise ValueError(f"teacher and student vocabularies differ ({len(teacher.tokenizer)} vs "
                         f"{len(student.tokenizer)} tokens): agreement needs one tokenizer")
    everything, decisions, missing_decision = Accumulator(), Accumulator(), 0
    for start in range(0, len(questions), batch_size):
        batch = questions[start:start + batch_size]
        answers = [str(question["ground_truth"]) for question in batch]
        outputs = {}
        for role, model in (("teacher", teacher), ("student", student)):
            sequences: list[AnswerSequence] = [
                answer_sequence(question["prompt"], answer, model.tokenizer, model.image_token_id,
                                model.num_image_tokens) for question, answer in zip(batch, answers)]
            pixels = load_pixels([image_dir / question["image"] for question in batch], model.image_size)
            outputs[role] = answer_token_logits(model.model, sequences, pixels.to(model.device, model.dtype))
        (teacher_logits, targets, rows), (student_logits, student_targets, _) = outputs["teacher"], outputs["student"]
        if not torch.equal(targets.cpu(), student_targets.cpu()):
            raise ValueError("teacher and student tokenize the answers differently: agreement needs one tokenizer")
        metrics = token_metrics(teacher_logits.cpu(), student_logits.cpu(), targets.cpu())
        rows = rows.cpu()
        for row, (question, answer) in enumerate(zip(batch, answers)):
            mine = {name: values[rows == row] for name, values in metrics.items()}
            everything.add(mine)
            index = decision_index(question["prompt"], answer, kind, student.tokenizer, student.image_token_id,
                                   student.num_image_tokens)
            if index is None or index >= mine["nll"].numel():
                missing_decision += index is not None
                continue
            decisions.add({name: values[index:index + 1] for name, values in mine.items()})
    if missing_decision:
        logger.warning("%d answers had a decision word that did not start a token; left out of 'decision'",
                       missing_decision)
    return {"all": everything.summary(), "decision": decisions.summary()}


def agreement(teacher_dir: Path, student_dir: Path, data_dir: Path, tasks: Sequence[str], limit: int | None = None,
              device: str = "auto") -> dict[str, dict[str, dict[str, float]]]:
    """{task: {"all": ..., "decision": ...}} for the tasks whose files exist in ``data_dir``."""
    torch_device, dtype = select_device(device)
    paths = {task: data_dir / f"{task}.jsonl" for task in tasks}
    for task, path in paths.items():
        if task not in TASK_KINDS:
            raise ValueError(f"--tasks: unknown task {task!r}; choose from {', '.join(TASK_KINDS)}")
        if not path.is_file():
            raise ValueError(f"{path} does not exist: write it with `python -m data_prep bench --task {task} ...`")
    teacher = load_eval_model(teacher_dir, torch_device, dtype)
    student = load_eval_model(student_dir, torch_device, dtype)
    results = {}
    for task, path in paths.items():
        questions = read_jsonl(path)[:limit]
        results[task] = task_agreement(teacher, student, questions, data_dir / "images", TASK_KINDS[task])
    return results


def format_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = [f"{'task':<20}{'tokens':<10}{'n':>6}{'nll':>16}{'KL(T||S)':>16}{'top-1 agree':>18}"]
    for task, groups in results.items():
        for group, values in groups.items():
            lines.append(f"{task:<20}{group:<10}{values['questions']:>6}"
                         f"{values['nll']:>10.4f} ±{values['nll_se']:<5.3f}{values['kl']:>10.4f} ±{values['kl_se']:<5.3f}"
                         f"{100 * values['top1']:>11.2f} ±{100 * values['top1_se']:<5.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kd_pipeline.eval agreement", description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, type=Path, help="teacher model folder (transformers LLaVA)")
    parser.add_argument("--student", required=True, type=Path, help="student model folder (same tokenizer)")
    parser.add_argument("--data", required=True, type=Path, help="evaluation sets (data_prep bench --out)")
    parser.add_argument("--tasks", default="aid,lrben,region_captioning",
                        help=f"comma-separated subset of {','.join(TASK_KINDS)} (default aid,lrben,region_captioning)")
    parser.add_argument("--limit", type=int, default=None, help="first N questions per task")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    options = parser.parse_args(argv)
    try:
        for folder in (options.teacher, options.student):
            if not (folder / "config.json").is_file():
                raise ValueError(f"{folder} has no config.json: give a transformers LLaVA folder "
                                 "(python -m kd_pipeline.export)")
        tasks = [task.strip() for task in options.tasks.split(",") if task.strip()]
        results = agreement(options.teacher, options.student, options.data, tasks, options.limit, options.device)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(results) if options.json else format_table(results))
    return 0
