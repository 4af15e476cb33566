"""``python -m data_prep tokenizer --instruct FILE [--text FILE ...] --out DIR [--vocab-size N]``

Trains a small LLaMA-style SentencePiece tokenizer (unk 0, bos 1, eos 2, byte fallback) on the conversation text of
an instruction file, rendered with both GeoChat templates so system prompts and role tags are single pieces. Real
runs use GeoChat's own ``tokenizer.model``; this exists for the embedded demo and tests, which may not download one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kd_pipeline.prompts import TEMPLATES, render
from kd_pipeline.tokenizer import train_tokenizer


def _texts(instruct: Path, extra: list[Path]) -> list[str]:
    records = json.loads(instruct.read_text()) if instruct.suffix == ".json" else [
        json.loads(line) for line in instruct.read_text().splitlines() if line.strip()]
    texts = [render(record["conversations"], name) for record in records for name in TEMPLATES
             if isinstance(record, dict) and record.get("conversations")]
    for path in extra:
        texts.extend(path.read_text().splitlines())
    return texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep tokenizer", description=__doc__.split("\n\n")[1])
    parser.add_argument("--instruct", type=Path, required=True, help="GeoChat-format JSON list or JSONL")
    parser.add_argument("--text", type=Path, nargs="*", default=[], help="more plain-text files (e.g. pt_corpus.txt)")
    parser.add_argument("--out", type=Path, required=True, help="folder to write tokenizer.model + configs into")
    parser.add_argument("--vocab-size", type=int, default=1000, help="SentencePiece vocabulary size (>= 300)")
    args = parser.parse_args(argv)
    for path in [args.instruct, *args.text]:
        if not path.is_file():
            print(f"error: {path} does not exist", file=sys.stderr)
            return 2
    try:
        texts = _texts(args.instruct, args.text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        print(f"error: {args.instruct} is not a JSON list or JSONL of records: {error}", file=sys.stderr)
        return 2
    train_tokenizer(texts, args.out, vocab_size=args.vocab_size)
    print(f"tokenizer written to {args.out} ({args.vocab_size} pieces from {len(texts)} texts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
