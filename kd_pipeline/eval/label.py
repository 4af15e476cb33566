"""``python -m kd_pipeline.eval label``: a model's greedy answers to prompts, written as GeoChat instruction records.

Runbook::

    python -m kd_pipeline.eval label --model models/teacher --instruct prompts.json --images IMAGES \\
        --out teacher_labelled.json [--template vicuna_v1] [--max-new-tokens 64] [--batch-size 32]
    python -m data_prep shard --instruct teacher_labelled.json --images IMAGES --out teacher_labelled_shards

This is sequence-level knowledge distillation (Kim & Rush, 2016), the pseudo-labelling a practitioner tries before
on-policy distillation and the baseline MiniLLM compares against: the teacher answers prompts that have no answer,
and the student is then trained on those answers with cross-entropy (``make repro``'s arm G).

Each record of ``--instruct`` (a GeoChat JSON list, e.g. a ``--prompts-only`` source) is answered after its last
human turn: the conversation up to there is rendered with ``--template`` (``vicuna_v1``, how GeoChat trains, so the
teacher answers in the setting it was trained in), the image is preprocessed as in training, and the model decodes
greedily (one beam, stop at EOS, the ``<image>`` id suppressed). A trailing answer in the input is replaced. The
output is the input records with the model's answer as the final ``gpt`` turn; records whose answer is empty are left out and counted. The output is
written atomically at the end (an interrupted run writes nothing; rerun it).

Exit status: 0; 2 on bad input (a missing or malformed file, a record without a human turn, an unusable image),
with one line naming it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from kd_pipeline.errors import UserError, user_errors_exit
from kd_pipeline.eval.generate import generate_from_ids, load_eval_model, load_pixels, select_device
from kd_pipeline.prompts import TEMPLATES, expand_image, render, tokenize_with_image

logger = logging.getLogger(__name__)


class LabelInputError(UserError, ValueError):
    """An instruction file or record that cannot be labelled, worded with the file, the record and the fix."""


def read_prompts(path: Path) -> list[dict]:
    """The records of a GeoChat JSON list, each with a conversation that has a human turn (checked here)."""
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise LabelInputError(f"--instruct {path} does not exist") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LabelInputError(f"--instruct {path} is not a JSON list of records ({error})") from error
    if not isinstance(records, list) or not records:
        raise LabelInputError(f"--instruct {path} must hold a non-empty JSON list of GeoChat records")
    for index, record in enumerate(records):
        turns = record.get("conversations") if isinstance(record, dict) else None
        if not isinstance(turns, list) or not any(isinstance(turn, dict) and turn.get("from") == "human"
                                                  for turn in turns):
            identifier = record.get("id") if isinstance(record, dict) else None
            raise LabelInputError(f"--instruct {path}: record {index} (id {identifier!r}) has no human turn to answer; "
                                  "give GeoChat records with 'conversations'")
        if not isinstance(record.get("image"), str):
            raise LabelInputError(f"--instruct {path}: record {index} has no 'image'; label answers image prompts")
    return records


def prompt_turns(record: dict) -> list[dict]:
    """The conversation up to and including its last human turn (a trailing answer is dropped)."""
    turns = record["conversations"]
    last_human = max(index for index, turn in enumerate(turns) if turn.get("from") == "human")
    return [{"from": turn["from"], "value": turn["value"]} for turn in turns[:last_human + 1]]


def label_records(eval_model, records: Sequence[dict], image_dir: Path, *, template: str, max_new_tokens: int,
                  batch_size: int) -> tuple[list[dict], int]:
    """(records with the model's answer as the last turn, number left out for an empty answer)."""
    labelled, empty = [], 0
    with tqdm(total=len(records), unit="prompt", desc="label") as progress:
        for start in range(0, len(records), batch_size):
            batch = records[start:start + batch_size]
            turns = [prompt_turns(record) for record in batch]
            sequences = []
            for conversation in turns:
                ids = tokenize_with_image(render(conversation, template, open_answer=True), eval_model.tokenizer,
                                          eval_model.image_token_id)
                sequences.append(expand_image(ids, ids, eval_model.image_token_id, eval_model.num_image_tokens)[0])
            pixels = load_pixels([image_dir / record["image"] for record in batch], eval_model.image_size)
            answers = generate_from_ids(eval_model, sequences, pixels, max_new_tokens,
                                        suppress_token_ids=(eval_model.image_token_id,))
            for record, conversation, answer in zip(batch, turns, answers):
                if not answer:
                    empty += 1
                    continue
                labelled.append({**record, "conversations": [*conversation, {"from": "gpt", "value": answer}]})
            progress.update(len(batch))
    return labelled, empty


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kd_pipeline.eval label", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", required=True, type=Path, help="exported model folder (the teacher)")
    parser.add_argument("--instruct", required=True, type=Path, help="GeoChat JSON list of prompt records")
    parser.add_argument("--images", required=True, type=Path, help="folder the records' 'image' paths are under")
    parser.add_argument("--out", required=True, type=Path, help="output JSON (the records with the model's answers)")
    parser.add_argument("--template", default="vicuna_v1", choices=sorted(TEMPLATES),
                        help="conversation template (vicuna_v1: GeoChat's training template)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="longest answer (default 64)")
    parser.add_argument("--batch-size", type=int, default=32, help="prompts decoded together (default 32)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise LabelInputError("--max-new-tokens and --batch-size must be at least 1")
    if not (args.model / "config.json").is_file():
        raise LabelInputError(f"--model {args.model} has no config.json: it is not an exported model folder; give a "
                              "kd_pipeline.export output")
    if not args.images.is_dir():
        raise LabelInputError(f"--images {args.images} is not a directory")
    records = read_prompts(args.instruct)
    eval_model = load_eval_model(args.model, *select_device(args.device))
    labelled, empty = label_records(eval_model, records, args.images, template=args.template,
                                    max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.out.with_name(args.out.name + ".tmp")
    temporary.write_text(json.dumps(labelled, indent=1))
    os.replace(temporary, args.out)
    logger.info("%d of %d prompts labelled by %s into %s (%d empty answers left out)", len(labelled), len(records),
                args.model, args.out, empty)
    return 0


if __name__ == "__main__":
    sys.exit(main())
