"""``python -m data_prep preview --shards DIR --tokenizer DIR [--template vicuna_v1] [--n K] [--split train] [--json]``

Shows what the model will see for the first K samples of a shard folder: the rendered prompt with the supervised
spans marked ``[[...]]`` (the answers and their ``</s>``, exactly the tokens whose labels are not -100), the token
counts and any bookkeeping mismatch. With ``--json``: a list of ``{"key", "prompt", "input_ids", "labels"}`` where
``prompt`` is the rendered text with the image shown once as ``<image>``, and ``input_ids``/``labels`` are the text
tokens with the image as ONE placeholder id (before the expansion to the image token block) and -100 where
unsupervised.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from pathlib import Path

from data_prep.manifest import read_manifest
from kd_pipeline.prompts import IGNORE_INDEX, TEMPLATES, encode_conversation, render
from kd_pipeline.tokenizer import TokenizerError, image_token_id, load_tokenizer


def _samples(shard_dir: Path, split: str, limit: int):
    """(key, record) pairs in manifest order, reading only the JSON members (images are not decoded)."""
    manifest = read_manifest(shard_dir)
    produced = 0
    for entry in manifest["shards"]:
        if entry["split"] != split:
            continue
        with tarfile.open(shard_dir / entry["name"]) as archive:
            for member in archive:
                if not member.name.endswith(".json"):
                    continue
                yield member.name[:-len(".json")], json.load(io.BytesIO(archive.extractfile(member).read()))
                produced += 1
                if produced == limit:
                    return


def _marked(tokenizer, input_ids: list[int], labels: list[int], image_id: int) -> str:
    """Decode, wrapping each supervised run of tokens in [[ ]] and showing the image once."""
    pieces, run, supervised = [], [], False
    for token, label in [*zip(input_ids, labels), (None, None)]:
        is_supervised = label is not None and label != IGNORE_INDEX
        if token is None or is_supervised != supervised:
            segments, current = [], []
            for item in run:  # decode around the image placeholder, which is shown once as <image>
                if item == image_id:
                    segments.append(current)
                    current = []
                else:
                    current.append(item)
            segments.append(current)
            text = "<image>".join(tokenizer.decode(segment, skip_special_tokens=False) for segment in segments)
            pieces.append(f"[[{text}]]" if supervised else text)
            run, supervised = [], is_supervised
        if token is not None:
            run.append(token)
    return "".join(pieces)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep preview", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, required=True, help="a `data_prep shard` output folder")
    parser.add_argument("--tokenizer", type=Path, required=True, help="tokenizer folder (tokenizer.model)")
    parser.add_argument("--template", choices=sorted(TEMPLATES), default="vicuna_v1", help="conversation template")
    parser.add_argument("--n", type=int, default=3, help="how many samples")
    parser.add_argument("--split", default="train", help="train, val or pt")
    parser.add_argument("--max-length", type=int, default=2048, help="text tokens kept (GeoChat: 2048)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    if not (args.shards / "manifest.json").is_file():
        print(f"error: {args.shards} has no manifest.json: not a `data_prep shard` output folder", file=sys.stderr)
        return 2
    try:
        tokenizer = load_tokenizer(args.tokenizer)
    except TokenizerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    image_id = image_token_id(tokenizer)
    rows = []
    for key, record in _samples(args.shards, args.split, args.n):
        conversations = record.get("conversations") or [{"from": "human", "value": record.get("text", "")}]
        # num_image_tokens=1 keeps the image as one placeholder, which is what this preview shows.
        sample = encode_conversation(conversations, tokenizer, image_token_id=image_id, num_image_tokens=1,
                                     template=args.template, max_length=args.max_length)
        rows.append({"key": key, "prompt": render(conversations, args.template), "input_ids": sample.input_ids,
                     "labels": sample.labels, "mismatch": sample.mismatch, "truncated": sample.truncated})
    if args.json:
        print(json.dumps([{k: row[k] for k in ("key", "prompt", "input_ids", "labels")} for row in rows], indent=1))
        return 0
    for row in rows:
        supervised = sum(label != IGNORE_INDEX for label in row["labels"])
        flags = " MISMATCH (whole sample masked)" if row["mismatch"] else ""
        flags += " TRUNCATED" if row["truncated"] else ""
        print(f"=== {row['key']}: {len(row['input_ids'])} tokens, {supervised} supervised{flags}")
        print(_marked(tokenizer, row["input_ids"], row["labels"], image_id))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
