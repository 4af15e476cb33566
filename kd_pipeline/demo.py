"""The embedded default: the paper at micro scale on one box, as one seed of the controlled experiment.
``make demo`` runs ``python -m kd_pipeline.demo --out demo_out``.

It is ``python -m kd_pipeline.repro`` for one seed and the paper's condition (teacher and student trained on the
same instructions; see kd_pipeline/repro/design.py), every step the real command-line tool:

 1. data        data_prep synth --profile repro -> shard; D_PT; tokenizer; data_prep bench (1,000 scene, 1,000 VQA,
                500 caption, 250 grounding questions)
 2. teacher     the larger model trained alone (run.stage=sft), exported
 3. A           the student trained alone (the baseline), exported; P (twice the data) and N (another seed) as
                positive and negative controls
 4. C / D / D0  from A: cross-entropy only (the compute-matched control), stage 1 (word-level KD + alignment),
                stage 1 without alignment
 5. E / F       stage 2 (reverse-KL policy gradient) from D's best checkpoint, and its cross-entropy control from C
 6. eval        forced choice and greedy answers, image-free baselines, teacher agreement (KL, top-1)

The table prints every number with its standard error beside the image-free baselines. An interrupted demo
continues where it stopped (run it again). ``--quick`` shrinks everything to a few minutes (part of the test
suite). One seed cannot say whether distillation works: ``make repro`` runs the 5-seed experiment with paired
tests. Exit code 0 when every step succeeded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kd_pipeline.repro.__main__ import main as repro_main
from kd_pipeline.repro.tasks import SeedPaths

TABLE8_ARMS = (("teacher", "ab"), ("A", "paper"), ("E", "paper"))


def efficiency_table(out: Path, seed: int) -> str:
    """Table 8 for the teacher, the student alone (A) and the distilled student (E): parameters (the paper's count)
    and forward FLOPs of one image + 64 text tokens."""
    paths = SeedPaths(out / f"seed{seed}")
    lines = ["| model | parameters, paper's count (M) | forward FLOPs, 1 image + 64 tokens (G) |", "|---|---:|---:|"]
    for arm, folder in TABLE8_ARMS:
        evaluation = paths.root / "eval" / folder / f"{arm}.json"
        if evaluation.is_file():
            efficiency = json.loads(evaluation.read_text())["efficiency"]
            lines.append(f"| {arm} | {efficiency['params_paper'] / 1e6:.3f} | "
                         f"{efficiency['flops_forward_matmul'] / 1e9:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kd_pipeline.demo", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (re-used to continue)")
    parser.add_argument("--quick", action="store_true", help="a few minutes: toy data and step counts")
    parser.add_argument("--seed", type=int, default=0, help="seed of the world and the runs (default 0)")
    parser.add_argument("--jobs", type=int, default=2, help="steps run at once (default 2)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    status = repro_main(["--out", str(out), "--seed-list", str(args.seed), "--conditions", "paper",
                         "--jobs", str(args.jobs), "--results", str(out / "results.json"),
                         *(["--quick"] if args.quick else [])])
    if status == 0:
        print("\nTable 8 (efficiency)\n" + efficiency_table(out, args.seed))
        print(f"\nResults: {out / 'results.json'}; tables: {out / 'report.md'}. One seed cannot say whether the "
              "distillation works: `make repro` runs the 5-seed experiment with paired tests.")
    return status


if __name__ == "__main__":
    sys.exit(main())
