"""``python -m kd_pipeline.eval run``: answer the evaluation sets with one or more models, then score and report.

Runbook::

    # one model, all six sets (written by `python -m data_prep bench ... --out /data/eval`)
    python -m kd_pipeline.eval run --model runs/kd/best_hf --data /data/eval --out runs/eval
    # several models one after another (each loaded, used, freed), names given explicitly, a quick smoke run
    python -m kd_pipeline.eval run --model teacher=hf/geochat-13b --model student=runs/kd/best_hf \\
        --tasks aid,hrben --data /data/eval --out runs/eval --limit 50
    # split over 8 GPUs: question i of the unanswered ones goes to rank i % 8
    torchrun --nproc-per-node 8 -m kd_pipeline.eval run --model runs/kd/best_hf --data /data/eval --out runs/eval
    # or one srun task per GPU (ranks from SLURM_PROCID/SLURM_NTASKS, as training reads them)
    srun --ntasks-per-node 8 python -m kd_pipeline.eval run --model runs/kd/best_hf --data /data/eval --out runs/eval

Input: ``--data DIR`` holds ``<task>.jsonl`` (question_id, image, prompt, ground_truth, type, ...) and ``images/``
as ``data_prep bench`` writes them. Every requested task file, and every image its questions name, must exist: a
missing one is an error (exit 2) before any model is loaded, so a typo cannot cost hours of generation; leave the
task out of ``--tasks`` instead.

Output in ``--out``:
- ``answers/<model>/<task>.jsonl``: GeoChat's answer records (question_id, image_id, answer, ground_truth, plus
  the question's prompt, task, type, class, size_group, dataset, obj_ids, image_width, image_height when set).
  Each rank appends its answers after every batch (flushed and fsynced): a single process straight into this
  file, rank r of a multi-process run into ``<task>.part<r>.jsonl``. At the end rank 0 merges the file and all
  part files (question order, first answer per question_id kept, answers of questions outside this run kept at
  the end) into ``<task>.jsonl`` atomically and removes the part files.
- Resume: on start every rank reads the file and all part files; answered question ids are skipped. A last line
  without its newline is a write cut short: it is ignored (and cut off before appending), so that question is
  answered again. A damaged line anywhere else is an error naming the file and line.
- ``results.json``, ``report.md`` and the figures (``report.write_report``) for the models of this invocation;
  scene sets are scored with ``scene``, VQA with ``vqa``, then ``referring`` and ``region_captioning``. A task
  whose scoring fails is logged, recorded as ``{"error": ...}`` in results.json, and the exit status is 1.

Exit status: 0 success, 1 a scorer or the report failed, 2 bad input (the message says what to fix).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kd_pipeline.errors import UserError, report_user_error
from kd_pipeline.eval.captioning import score_region_captioning
from kd_pipeline.eval.generate import (MAX_NEW_TOKENS, encode_question, free_eval_model, generate_answers, left_pad,
                                       load_eval_model, load_pixels, select_device)
from kd_pipeline.eval.images import image_size_lookup
from kd_pipeline.eval.records import read_jsonl
from kd_pipeline.eval.referring import score_referring
from kd_pipeline.eval.report import write_report
from kd_pipeline.eval.scene import score_scene
from kd_pipeline.eval.vqa import score_vqa
from kd_pipeline.fileio import write_atomic
from kd_pipeline.runtime import cuda_device_index, discover_ranks, export_rendezvous

logger = logging.getLogger(__name__)

TASKS = ("aid", "ucmerced", "lrben", "hrben", "referring", "region_captioning")
SCORER_OF_TASK = {"aid": "scene", "ucmerced": "scene", "lrben": "vqa", "hrben": "vqa",
                  "referring": "referring", "region_captioning": "region_captioning"}
CARRIED_FIELDS = ("prompt", "task", "type", "class", "size_group", "dataset", "obj_ids", "image_width",
                  "image_height")
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
# Ranks wait for the slowest one at the final barrier; hours of generation must not trip gloo's 30-minute default.
BARRIER_TIMEOUT = datetime.timedelta(hours=24)


class RunInputError(UserError, ValueError):
    """Bad command-line input or evaluation files, worded with what to fix."""


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun launch (rank 0 of 1 when launched plainly)."""

    rank: int
    world_size: int
    local_rank: int


# ----------------------------------------------------------------------------------------------------- inputs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kd_pipeline.eval run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, metavar="[NAME=]DIR",
                        help="transformers LLaVA folder with its tokenizer; NAME defaults to the folder name "
                             "(repeat for several models, evaluated one after another)")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    parser.add_argument("--data", required=True, type=Path, help="normalized evaluation sets (data_prep bench --out)")
    parser.add_argument("--out", required=True, type=Path, help="output folder (answers/, results.json, report.md)")
    parser.add_argument("--batch-size", type=int, default=8, help="questions per generate call (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS,
                        help=f"greedy decoding length limit (default {MAX_NEW_TOKENS})")
    parser.add_argument("--limit", type=int, help="only the first N questions of each task (smoke runs)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: CUDA + bf16 when available, else CPU + fp32")
    parser.add_argument("--no-meteor", action="store_true", help="region_captioning: skip METEOR (reported as null)")
    parser.add_argument("--no-latency", action="store_true",
                        help="Table 8: skip the measured generation latency (parameters and FLOPs are still reported)")
    parser.add_argument("--no-paper", action="store_true", help="leave the paper's columns out of report.md")
    return parser


def parse_model_spec(spec: str) -> tuple[str, Path]:
    """``NAME=DIR`` or ``DIR`` (named after the folder) -> (name, folder)."""
    name, separator, folder = spec.partition("=")
    if not separator or "/" in name or os.sep in name:
        name, folder = Path(spec.rstrip("/" + os.sep)).name, spec
    if not MODEL_NAME.fullmatch(name):
        raise RunInputError(f"--model {spec!r}: model name {name!r} must be letters, digits, '.', '_', '+', '-' "
                            "(it names the answers folder); give NAME=DIR")
    return name, Path(folder)


def parse_models(specs: Sequence[str]) -> dict[str, Path]:
    """{name: folder} in command-line order; names must be unique and folders must hold a config.json."""
    models: dict[str, Path] = {}
    for spec in specs:
        name, folder = parse_model_spec(spec)
        if name in models:
            raise RunInputError(f"two --model arguments are named {name!r}: name them with NAME=DIR")
        if not (folder / "config.json").is_file():
            raise RunInputError(f"--model {spec!r}: {folder} has no config.json (give a transformers LLaVA folder, "
                                "e.g. from python -m kd_pipeline.convert geochat-to-hf)")
        models[name] = folder
    return models


def parse_tasks(text: str) -> list[str]:
    tasks = [task.strip().lower() for task in text.split(",") if task.strip()]
    unknown = [task for task in tasks if task not in TASKS]
    if unknown or not tasks:
        raise RunInputError(f"--tasks {text!r}: unknown {unknown or 'empty list'}; choose from {', '.join(TASKS)}")
    return list(dict.fromkeys(tasks))


def load_questions(data_dir: Path, task: str, limit: int | None) -> list[dict[str, Any]]:
    """The task's normalized questions (the first ``limit`` when given); checks the fields generation needs."""
    path = data_dir / f"{task}.jsonl"
    if not path.is_file():
        raise RunInputError(f"{path} does not exist: write it with `python -m data_prep bench --task {task} ... "
                            f"--out {data_dir}` or leave {task} out of --tasks")
    questions = read_jsonl(path)
    seen: set[str] = set()
    for line_number, question in enumerate(questions, start=1):
        missing = [key for key in ("question_id", "image", "prompt") if question.get(key) in (None, "")]
        if missing:
            raise RunInputError(f"{path}: question {line_number} lacks {', '.join(missing)}; re-create the set "
                                "with data_prep bench")
        if str(question["question_id"]) in seen:
            raise RunInputError(f"{path}: question_id {question['question_id']!r} appears twice (answers are "
                                "resumed by question_id); re-create the set with data_prep bench")
        seen.add(str(question["question_id"]))
    questions = questions[:limit] if limit is not None else questions
    missing_images = [question for question in questions if not (data_dir / "images" / question["image"]).is_file()]
    if missing_images:  # found before any model loads; a file that exists but cannot be decoded shows up later
        first = missing_images[0]
        raise RunInputError(f"{path}: {len(missing_images)} questions name images missing from {data_dir / 'images'}, "
                            f"e.g. question {first['question_id']!r}: {first['image']}; re-create the set with "
                            f"data_prep bench or restore the images")
    return questions


# ----------------------------------------------------------------------------------------------------- answer files


def part_path(answers_dir: Path, task: str, dist: Dist) -> Path:
    """The file this rank appends to: the task file itself for a single process, else its own part file."""
    if dist.world_size == 1:
        return answers_dir / f"{task}.jsonl"
    return answers_dir / f"{task}.part{dist.rank}.jsonl"


def answer_files(answers_dir: Path, task: str) -> list[Path]:
    """The merged task file and every part file (of any earlier world size), those that exist."""
    parts = sorted(answers_dir.glob(f"{task}.part*.jsonl"))
    merged = answers_dir / f"{task}.jsonl"
    return ([merged] if merged.is_file() else []) + parts


def read_answers(path: Path) -> tuple[list[dict[str, Any]], int]:
    """(records, byte length of the complete lines) of an answer file.

    A last line without its newline was cut short by an interrupted write: it is left out (logged). Any other
    line that is not a JSON object raises RunInputError naming the file and line.
    """
    data = path.read_bytes()
    complete_length = data.rfind(b"\n") + 1
    if complete_length < len(data):
        logger.warning("%s: last line is incomplete (interrupted write): ignored, its question is answered again",
                       path)
    records = []
    for line_number, line in enumerate(data[:complete_length].decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise RunInputError(f"{path}:{line_number} is not valid JSON ({error.msg}): only the last line may be "
                                "damaged by an interruption; fix or delete that line") from error
        if not isinstance(record, dict) or "question_id" not in record:
            raise RunInputError(f"{path}:{line_number} is not an answer record with a question_id; fix or delete it")
        records.append(record)
    return records, complete_length


def cut_partial_line(path: Path) -> None:
    """Truncate ``path`` after its last complete line so appended records start on a line of their own."""
    if path.is_file():
        _, complete_length = read_answers(path)
        if complete_length < path.stat().st_size:
            with path.open("r+b") as stream:
                stream.truncate(complete_length)


def answered_ids(answers_dir: Path, task: str) -> set[str]:
    """question_ids (as strings) answered in the task file or any part file."""
    ids: set[str] = set()
    for path in answer_files(answers_dir, task):
        ids.update(str(record["question_id"]) for record in read_answers(path)[0])
    return ids


def answer_record(question: Mapping[str, Any], answer: str) -> dict[str, Any]:
    """GeoChat's answer format plus the question fields the scorers and the report group by."""
    record = {"question_id": question["question_id"], "image_id": question["image"], "answer": answer,
              "ground_truth": question.get("ground_truth")}
    record.update({key: question[key] for key in CARRIED_FIELDS if question.get(key) is not None})
    return record


def append_answers(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Append one JSON line per record, flushed and fsynced, so an interruption loses at most the batch in flight."""
    payload = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    with path.open("a", encoding="utf-8") as stream:
        stream.write(payload)
        stream.flush()
        os.fsync(stream.fileno())


def merge_answers(answers_dir: Path, task: str, questions: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Merge the task file and its part files into ``<task>.jsonl`` (atomically) and delete the part files.

    Order: the questions' order, then answers to question ids not in ``questions`` (an earlier run over more
    questions) in file order; the first answer of a question_id wins. Returns the answers to ``questions``.
    """
    files = answer_files(answers_dir, task)
    by_id: dict[str, dict[str, Any]] = {}
    for path in files:
        for record in read_answers(path)[0]:
            by_id.setdefault(str(record["question_id"]), record)
    question_ids = [str(question["question_id"]) for question in questions]
    wanted = set(question_ids)
    ordered = [by_id[question_id] for question_id in question_ids if question_id in by_id]
    others = [record for question_id, record in by_id.items() if question_id not in wanted]
    merged_path = answers_dir / f"{task}.jsonl"
    write_atomic(merged_path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in ordered + others))
    for path in files:
        if path != merged_path:
            path.unlink()
    return ordered


# ----------------------------------------------------------------------------------------------------- ranks


def split_for_rank(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """Item i goes to rank i % world_size (round robin keeps the ranks' shares within one item of each other)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    return list(items[rank::world_size])


def init_dist() -> Dist:
    """This process's rank as training finds it (``runtime.discover_ranks``: torchrun/deepspeed's RANK, or one
    ``srun`` task per rank); several ranks join a gloo group (used only for barriers)."""
    info = discover_ranks()
    dist = Dist(rank=info.rank, world_size=info.world_size, local_rank=info.local_rank)
    if dist.world_size > 1 and not torch.distributed.is_initialized():
        export_rendezvous(info)
        torch.distributed.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    return dist


def barrier(dist: Dist) -> None:
    if dist.world_size > 1:
        torch.distributed.barrier()


# ----------------------------------------------------------------------------------------------------- generation


def answer_questions(eval_model, questions: Sequence[Mapping[str, Any]], image_dir: Path, out_path: Path,
                     batch_size: int, max_new_tokens: int, description: str, show_progress: bool) -> None:
    """Generate answers batch by batch, appending each batch's records to ``out_path`` as soon as it is done."""
    cut_partial_line(out_path)
    with tqdm(total=len(questions), desc=description, unit="question", disable=not show_progress) as progress:
        for start in range(0, len(questions), batch_size):
            batch = questions[start:start + batch_size]
            pixel_values = load_pixels([image_dir / question["image"] for question in batch],
                                       eval_model.image_size)  # (B, 3, S, S)
            answers = generate_answers(eval_model, [question["prompt"] for question in batch], pixel_values,
                                       max_new_tokens)
            append_answers(out_path, [answer_record(question, answer) for question, answer in zip(batch, answers)])
            progress.update(len(batch))


def plan_rank(models: Mapping[str, Path], questions_by_task: Mapping[str, list[dict[str, Any]]], out_dir: Path,
              dist: Dist) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """{(model, task): this rank's share of the unanswered questions}, from the answer files on disk.

    Every rank must call this before any rank writes answers (``run_generation`` puts a barrier between them):
    a rank reading after another rank's first batch would see fewer unanswered questions and split differently.
    """
    pending: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for name in models:
        answers_dir = out_dir / "answers" / name
        answers_dir.mkdir(parents=True, exist_ok=True)
        for task, questions in questions_by_task.items():
            done = answered_ids(answers_dir, task)
            unanswered = [question for question in questions if str(question["question_id"]) not in done]
            if dist.rank == 0:
                logger.info("%s/%s: %d questions, %d answered earlier, %d to answer", name, task, len(questions),
                            len(questions) - len(unanswered), len(unanswered))
            pending[name, task] = split_for_rank(unanswered, dist.rank, dist.world_size)
    return pending


def generate_pending(models: Mapping[str, Path], pending: Mapping[tuple[str, str], list[dict[str, Any]]],
                     options: argparse.Namespace, dist: Dist) -> None:
    """Answer this rank's share, model after model; a model with nothing left to answer is not even loaded."""
    gpu_index = cuda_device_index(dist.local_rank) if options.device != "cpu" and torch.cuda.is_available() else 0
    device, dtype = select_device(options.device, gpu_index)
    tasks = list(dict.fromkeys(task for _, task in pending))
    for name, folder in models.items():
        if not any(pending[name, task] for task in tasks):
            continue
        eval_model = load_eval_model(folder, device, dtype)
        for task in tasks:
            answer_questions(eval_model, pending[name, task], options.data / "images",
                             part_path(options.out / "answers" / name, task, dist), options.batch_size,
                             options.max_new_tokens, f"{name}/{task}", show_progress=dist.rank == 0)
        free_eval_model(eval_model)


def run_generation(models: Mapping[str, Path], questions_by_task: Mapping[str, list[dict[str, Any]]],
                   options: argparse.Namespace, dist: Dist) -> None:
    """Plan on every rank, wait for all, then generate (see ``plan_rank`` for why the barrier sits there)."""
    pending = plan_rank(models, questions_by_task, options.out, dist)
    barrier(dist)
    generate_pending(models, pending, options, dist)


# ----------------------------------------------------------------------------------------------------- scoring


def score_task(task: str, records: list[dict[str, Any]], image_dir: Path, meteor: bool) -> dict[str, Any]:
    """The task's scorer on its answer records (see the module docstring for which scorer)."""
    scorers: dict[str, Callable[[list[dict[str, Any]]], dict[str, Any]]] = {
        "scene": score_scene,
        "vqa": score_vqa,
        "referring": lambda rows: score_referring(rows, image_size_lookup(image_dir)),
        "region_captioning": lambda rows: score_region_captioning(rows, meteor="auto" if meteor else "off"),
    }
    if not records:
        raise ValueError(f"{task}: no answers to score")
    return scorers[SCORER_OF_TASK[task]](records)


HEADLINE_METRICS = {"scene": ("oa", "aa"), "vqa": ("moa", "oa"), "referring": ("acc@0.5", "acc@0.25"),
                    "region_captioning": ("rouge1", "rougeL", "meteor")}


def summary_table(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """One line per model and task with the headline metrics in percent."""
    lines = [f"{'model':<24}{'task':<20}{'n':>6}  metrics (%)"]
    for name, tasks in results.items():
        for task, metrics in tasks.items():
            if task == "efficiency":
                lines.append(f"{name:<24}{task:<20}{'':>6}  params (paper) {metrics['params_paper'] / 1e6:.2f} M, "
                             f"generation {metrics.get('tokens_per_s', 0):.1f} tokens/s")
                continue
            if "error" in metrics:
                lines.append(f"{name:<24}{task:<20}{'-':>6}  error: {metrics['error']}")
                continue
            values = [f"{key} {100 * metrics[key]:.2f}" if metrics.get(key) is not None else f"{key} -"
                      for key in HEADLINE_METRICS[SCORER_OF_TASK[task]]]
            lines.append(f"{name:<24}{task:<20}{metrics['n']:>6}  " + ", ".join(values))
    return "\n".join(lines)


EFFICIENCY_TEXT_TOKENS = 64  # the stated input of Table 8's forward: one image + 64 text tokens
LATENCY_NEW_TOKENS = 16


def model_efficiency(model_dir: Path, options: argparse.Namespace) -> dict[str, Any]:
    """Table 8 for one model: parameters (paper's way and total), forward FLOPs of one image + 64 text tokens
    (analytic, cross-checked against FlopCounterMode in the tests), and measured greedy-generation latency."""
    from kd_pipeline.eval.efficiency import efficiency_metrics, measure_generation

    device, dtype = select_device(options.device)
    eval_model = load_eval_model(model_dir, device, dtype)
    try:
        metrics = efficiency_metrics(eval_model.model, eval_model.model.config, EFFICIENCY_TEXT_TOKENS)
        if not options.no_latency:
            ids = encode_question("Describe the image in detail", eval_model.tokenizer, eval_model.image_token_id,
                                  eval_model.num_image_tokens)
            input_ids, attention_mask = left_pad([ids])
            size = eval_model.image_size
            inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
                      "pixel_values": torch.zeros(1, 3, size, size, device=device, dtype=dtype)}
            timing = measure_generation(eval_model.model, inputs, LATENCY_NEW_TOKENS)
            metrics.update(latency_s=timing.latency_s, tokens_per_s=timing.tokens_per_s,
                           latency_note=f"{LATENCY_NEW_TOKENS} greedy tokens, batch 1, {device.type} {dtype}")
    finally:
        free_eval_model(eval_model)
    return metrics


def score_and_report(models: Mapping[str, Path], questions_by_task: Mapping[str, list[dict[str, Any]]],
                     options: argparse.Namespace) -> int:
    """Merge answer files, score every model and task, write results.json / report.md; returns the exit status."""
    image_dir = options.data / "images"
    results: dict[str, dict[str, dict[str, Any]]] = {}
    grounding_records: dict[str, list[dict[str, Any]]] = {}
    status = 0
    for name in models:
        results[name] = {}
        for task, questions in questions_by_task.items():
            records = merge_answers(options.out / "answers" / name, task, questions)
            if len(records) < len(questions):
                logger.warning("%s/%s: %d of %d questions have no answer; scored without them", name, task,
                               len(questions) - len(records), len(questions))
            try:
                results[name][task] = score_task(task, records, image_dir, meteor=not options.no_meteor)
            except ValueError as error:
                logger.error("%s/%s cannot be scored: %s", name, task, error)
                results[name][task] = {"error": str(error)}
                status = 1
                continue
            if task == "referring":
                grounding_records[name] = records
    for name, model_dir in models.items():  # rank 0 only (see main)
        results[name]["efficiency"] = model_efficiency(model_dir, options)
    try:
        written = write_report(results, options.out, include_paper=not options.no_paper,
                               grounding_records=grounding_records or None, image_dir=image_dir)
    except (ValueError, OSError) as error:
        logger.error("the report could not be completed (%s); results.json may be written", error)
        return 1
    print(summary_table(results))
    print("\n".join(str(path) for path in written.values()))
    return status


# ----------------------------------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status (argparse errors return 2 instead of exiting)."""
    parser = build_parser()
    try:
        options = parser.parse_args(argv)
    except SystemExit as exit_request:
        return int(exit_request.code or 0)
    try:
        if options.batch_size < 1 or options.max_new_tokens < 1 or (options.limit is not None and options.limit < 1):
            raise RunInputError("--batch-size, --max-new-tokens and --limit must be at least 1")
        models = parse_models(options.model)
        questions_by_task = {task: load_questions(options.data, task, options.limit)
                             for task in parse_tasks(options.tasks)}
        select_device(options.device)
    except (ValueError, FileNotFoundError) as error:
        return report_user_error(error)
    dist = init_dist()
    try:
        run_generation(models, questions_by_task, options, dist)
    except UserError as error:
        return report_user_error(error)
    try:
        barrier(dist)
        return score_and_report(models, questions_by_task, options) if dist.rank == 0 else 0
    finally:
        if dist.world_size > 1:
            torch.distributed.destroy_process_group()
