"""Command line of the evaluation package.

    # score an answer file (GeoChat's batch_geochat_*.py output or this project's), table or one JSON object
    python -m kd_pipeline.eval score --task scene --answers aid_answers.jsonl --json
    python -m kd_pipeline.eval score --task vqa --answers hrben_answers.jsonl --questions hrben.jsonl
    python -m kd_pipeline.eval score --task referring --answers ref_answers.jsonl --image-dir GeoChat-Bench/images
    python -m kd_pipeline.eval score --task region_captioning --answers region_answers.jsonl

    # Table 8 for GeoChat's 7B/13B shapes (meta-device models: no weights needed)
    python -m kd_pipeline.eval efficiency --text-tokens 64

    # report.md / results.json / figures from {model: {benchmark: metrics}} JSON
    python -m kd_pipeline.eval report --results all_results.json --out runs/report

    # generation over the benchmarks (kd_pipeline/eval/run.py, imported only when asked for)
    python -m kd_pipeline.eval run ...

    # per-token teacher-student agreement on held-out answers (kd_pipeline/eval/agreement.py)
    python -m kd_pipeline.eval agreement --teacher DIR --student DIR --data DIR [--json]

    # a model's greedy answers to prompts as instruction records: sequence-level KD (kd_pipeline/eval/label.py)
    python -m kd_pipeline.eval label --model DIR --instruct prompts.json --images DIR --out labelled.json

Exit status: 0 on success, 2 on bad input (the message names the file or field and what to do).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kd_pipeline.errors import report_user_error, user_errors_exit
from kd_pipeline.eval.captioning import score_region_captioning
from kd_pipeline.eval.images import image_size_lookup
from kd_pipeline.eval.records import join_questions, read_jsonl
from kd_pipeline.eval.referring import score_referring
from kd_pipeline.eval.scene import score_scene
from kd_pipeline.eval.vqa import score_vqa

logger = logging.getLogger("kd_pipeline.eval")

TASKS = ("scene", "vqa", "referring", "region_captioning")
RUN_MODULE = "kd_pipeline.eval.run"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kd_pipeline.eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    score = commands.add_parser("score", help="score an answer jsonl file")
    score.add_argument("--task", required=True, choices=TASKS, help="benchmark family of the answers")
    score.add_argument("--answers", required=True, type=Path, help="answer jsonl (one record per question)")
    score.add_argument("--questions", type=Path,
                       help="question jsonl supplying the fields the answers lack (joined on question_id)")
    score.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    score.add_argument("--image-dir", type=Path, help="referring: images (image_id.png) to read image sizes from")
    score.add_argument("--image-size", type=float, nargs=2, metavar=("WIDTH", "HEIGHT"),
                       help="referring: one image size for every record without its own width/height")
    score.add_argument("--no-meteor", action="store_true", help="region_captioning: skip METEOR (reported as null)")
    score.add_argument("--no-stemmer", action="store_true", help="region_captioning: ROUGE without Porter stemming")

    efficiency = commands.add_parser("efficiency", help="Table 8 numbers for GeoChat's 7B/13B shapes")
    efficiency.add_argument("--sizes", nargs="+", default=["7b", "13b"], choices=["7b", "13b"])
    efficiency.add_argument("--text-tokens", type=int, default=64, help="prompt length besides the image tokens")
    efficiency.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    report = commands.add_parser("report", help="write report.md, results.json and figures")
    report.add_argument("--results", required=True, type=Path, help="JSON {model: {benchmark: metrics}}")
    report.add_argument("--out", required=True, type=Path, help="output folder")
    report.add_argument("--no-paper", action="store_true", help="leave the paper's columns out of report.md")

    commands.add_parser("run", add_help=False,
                        help=f"generate benchmark answers ({RUN_MODULE}; arguments pass through)")
    commands.add_parser("agreement", add_help=False,
                        help="teacher-student agreement on held-out answers: NLL, KL(p_T||p_S), top-1 "
                             "(kd_pipeline/eval/agreement.py; arguments pass through)")
    commands.add_parser("label", add_help=False,
                        help="a model's greedy answers to prompts written as instruction records (sequence-level "
                             "KD; kd_pipeline/eval/label.py; arguments pass through)")
    return parser


def score_file(
    task: str,
    answers_path: Path,
    questions_path: Path | None = None,
    image_dir: Path | None = None,
    image_size: Sequence[float] | None = None,
    meteor: bool = True,
    use_stemmer: bool = True,
) -> dict[str, Any]:
    """Read (and join) the files and run the task's scorer; returns the scorer's dict plus `answers_file`."""
    answers = read_jsonl(answers_path)
    if not answers:
        raise ValueError(f"{answers_path} holds no answer records")
    records = join_questions(answers, read_jsonl(questions_path) if questions_path else [])
    scorers: dict[str, Callable[[list[dict[str, Any]]], dict[str, Any]]] = {
        "scene": score_scene,
        "vqa": score_vqa,
        "referring": lambda rows: score_referring(
            rows, image_size_lookup(image_dir, tuple(image_size) if image_size else None)),
        "region_captioning": lambda rows: score_region_captioning(
            rows, use_stemmer=use_stemmer, meteor="auto" if meteor else "off"),
    }
    metrics = scorers[task](records)
    metrics["answers_file"] = str(answers_path)
    return metrics


def format_table(metrics: Mapping[str, Any]) -> str:
    """Human-readable lines: fractions also as percent, nested groups indented, the confusion matrix summarised."""
    lines = []

    def add(key: str, value: Any, indent: int) -> None:
        pad = "  " * indent
        width = 32 - len(pad)
        if key == "confusion":
            lines.append(f"{pad}{'confusion':<{width}}{len(value['true_labels'])} classes (matrix in --json output)")
        elif isinstance(value, Mapping):
            lines.append(f"{pad}{key}")
            for sub_key, sub_value in value.items():
                add(str(sub_key), sub_value, indent + 1)
        elif isinstance(value, float):
            lines.append(f"{pad}{key:<{width}}{value:.4f}" + (f"  ({100 * value:.2f}%)" if 0.0 <= value <= 1.0 else ""))
        else:
            lines.append(f"{pad}{key:<{width}}{value}")

    for key, value in metrics.items():
        add(key, value, 0)
    return "\n".join(lines)


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] == "run":
        return _run(argv[1:])
    if argv and argv[0] == "agreement":
        from kd_pipeline.eval.agreement import main as agreement_main

        return agreement_main(argv[1:])
    if argv and argv[0] == "label":
        from kd_pipeline.eval.label import main as label_main

        return label_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "score":
            metrics = score_file(args.task, args.answers, args.questions, args.image_dir, args.image_size,
                                 meteor=not args.no_meteor, use_stemmer=not args.no_stemmer)
            print(json.dumps(metrics) if args.json else format_table(metrics))
        elif args.command == "efficiency":
            from kd_pipeline.eval.efficiency import geochat_efficiency_rows

            rows = geochat_efficiency_rows(args.text_tokens, tuple(args.sizes))
            print(json.dumps(rows) if args.json else _format_efficiency(rows))
        elif args.command == "report":
            from kd_pipeline.eval.report import write_report

            results = json.loads(args.results.read_text(encoding="utf-8"))
            written = write_report(results, args.out, include_paper=not args.no_paper)
            print("\n".join(str(path) for path in written.values()))
    except (ValueError, FileNotFoundError) as error:  # json.JSONDecodeError is a ValueError
        return report_user_error(error)
    return 0


def _run(run_argv: list[str]) -> int:
    run_module = importlib.import_module(RUN_MODULE)  # imported here: it pulls in torch and the models
    return int(run_module.main(run_argv) or 0)


def _format_efficiency(rows: Mapping[str, Mapping[str, Any]]) -> str:
    header = (f"{'model':<14}{'params paper (M)':>18}{'params total (M)':>18}"
              f"{'FLOPs paper (G)':>18}{'FLOPs fwd (G)':>16}")
    lines = [header]
    for name, row in rows.items():
        lines.append(f"{name:<14}{row['params_paper'] / 1e6:>18.2f}{row['params_total'] / 1e6:>18.2f}"
                     f"{row['flops_paper_convention'] / 1e9:>18.2f}{row['flops_forward_matmul'] / 1e9:>16.2f}")
    lines.append(next(iter(rows.values()))["flops_convention"] if rows else "")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
