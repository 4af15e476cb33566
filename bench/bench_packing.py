"""How much of a training batch is padding, with and without packing (``data.packing``): the non-pad share of the
positions the model runs, for GeoChat's sequence lengths (1,296 image tokens + the text), per micro-batch size.

Two length distributions:
- ``geochat_stated``: GeoChat's stated statistics (docs/geochat.md): every sample one 504-px image (1,296 image
  tokens) plus 50-2,048 text tokens. Only the range is stated, so the text length is taken uniform on it (an
  assumption: the real distribution is not known here).
- ``synthetic_world``: the records of ``data_prep synth`` (the demo's world), rendered with the vicuna_v1 template
  and GeoChat's labels (``encode_conversation``), tokenized with a SentencePiece model trained on that world
  (``data_prep tokenizer``), images expanded to 1,296 tokens as at 504 px; text-only records have no image block.

Samples are taken in a seeded random order (the loader shuffles) ``micro_batch_size`` at a time. Columns
(``kd_pipeline.data.packing.token_fractions``): ``padded`` (every row as long as the micro-batch's longest sample),
``packed_rows`` (sdpa / eager: first-fit decreasing into rows of that length) and ``packed_flat`` (flash-attn: one
unpadded sequence, 1.0 by construction). Pure arithmetic on token counts: no timing, nothing machine-dependent.

    python bench/bench_packing.py            # -> bench/results/packing.json
    python bench/bench_packing.py --quick    # smaller samples (smoke run)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from kd_pipeline.data.packing import token_fractions  # noqa: E402

RESULTS = REPO_ROOT / "bench" / "results" / "packing.json"
IMAGE_TOKENS = 1296          # 504 px / patch 14 = 36 x 36
TEXT_RANGE = (50, 2048)      # GeoChat's stated text tokens per sample
MICRO_BATCH_SIZES = (2, 4, 8)  # 4: configs/geochat_13b_to_7b.yaml


def geochat_stated_lengths(count: int, seed: int) -> list[int]:
    """Sequence lengths of ``count`` samples: the image block (which replaces one placeholder) plus uniform text."""
    rng = random.Random(seed)
    return [IMAGE_TOKENS - 1 + rng.randint(*TEXT_RANGE) for _ in range(count)]


def synthetic_world_lengths(count: int, seed: int, vocab_size: int) -> list[int]:
    """Sequence lengths of the synthetic world's training records under GeoChat's template and image size."""
    from data_prep.__main__ import main as data_prep
    from kd_pipeline.prompts import encode_conversation
    from kd_pipeline.tokenizer import image_token_id, load_tokenizer

    with tempfile.TemporaryDirectory() as scratch:
        world = Path(scratch) / "world"
        if data_prep(["synth", "--out", str(world), "--num", str(count), "--seed", str(seed), "--image-size", "16",
                      "--bench-num", "0", "--pt-lines", "10"]) != 0:
            raise RuntimeError("data_prep synth failed")
        if data_prep(["tokenizer", "--instruct", str(world / "instruct.json"), "--out", str(Path(scratch) / "tok"),
                      "--vocab-size", str(vocab_size)]) != 0:
            raise RuntimeError("data_prep tokenizer failed")
        tokenizer = load_tokenizer(Path(scratch) / "tok")
        records = json.loads((world / "instruct.json").read_text())
    image_id = image_token_id(tokenizer)
    return [len(encode_conversation(record["conversations"], tokenizer, image_token_id=image_id,
                                    num_image_tokens=IMAGE_TOKENS, max_length=TEXT_RANGE[1]).input_ids)
            for record in records]


def summarise(lengths: list[int], seed: int) -> dict:
    order = list(lengths)
    random.Random(seed).shuffle(order)
    return {"samples": len(lengths), "mean_length": sum(lengths) / len(lengths), "min_length": min(lengths),
            "max_length": max(lengths),
            "by_micro_batch": {str(size): token_fractions(order, size) for size in MICRO_BATCH_SIZES}}


def format_table(results: dict) -> str:
    lines = [f"{'distribution':<18} {'micro-batch':>11} {'padded':>8} {'packed rows':>12} {'packed flat':>12}"]
    for name, summary in results.items():
        for size, fractions in summary["by_micro_batch"].items():
            lines.append(f"{name:<18} {size:>11} {fractions['padded']:>8.3f} {fractions['packed_rows']:>12.3f} "
                         f"{fractions['packed_flat']:>12.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    parser.add_argument("--samples", type=int, default=20000, help="samples drawn from the stated statistics")
    parser.add_argument("--world-records", type=int, default=2000, help="records of the synthetic world")
    parser.add_argument("--vocab-size", type=int, default=4000, help="tokenizer pieces for the synthetic world")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default bench/results/packing.json)")
    args = parser.parse_args(argv)
    samples, records = (800, 200) if args.quick else (args.samples, args.world_records)
    results = {"geochat_stated": summarise(geochat_stated_lengths(samples, args.seed), args.seed),
               "synthetic_world": summarise(synthetic_world_lengths(records, args.seed, args.vocab_size), args.seed)}
    report = {"image_tokens": IMAGE_TOKENS, "text_range": TEXT_RANGE, "seed": args.seed, "quick": args.quick,
              "command": "python bench/bench_packing.py" + (" --quick" if args.quick else ""), "results": results}
    output = args.output or RESULTS.with_name("packing_quick.json" if args.quick else RESULTS.name)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(results))
    print(f"written {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
