"""The embedded default: the paper at micro scale on one box, as one seed of the controlled experiment (design 2).
``make demo`` runs ``python -m kd_pipeline.demo --out demo_out``.

It is ``python -m kd_pipeline.repro`` for one seed in the ``unlabelled`` condition, where on-policy distillation
should show (the student has the answers of a quarter of the teacher's instructions, stage 2 sees the prompts of
all of them; kd_pipeline/repro/design.py), every step the real command-line tool:

 1. data        data_prep synth --profile repro -> shard (the labelled share, all of S, S's prompts without answers
                via --prompts-only); D_PT; tokenizer; data_prep bench (1,000 scene, 999 VQA, 500 caption questions)
 2. teacher     the larger model trained alone on all of S (run.stage=sft), exported
 3. A, N        the student trained alone on its labels (the baseline), and with another seed (negative control)
 4. C, Pc, D    from A: cross-entropy on the labels (the compute-matched control), on all labels (positive
                control), and stage 1 (Table 1: word-level KD with the ground truth)
 5. E, E_ss     stage 2 from D's best checkpoint on all of S's prompts (eq. 10: reverse-KL policy gradient,
                delta_align, PT loss), and with the single-step term only
 6. F, G        from C on E's schedule: cross-entropy on the labels, and with the teacher's greedy answers to the
                unlabelled prompts added (eval label: sequence-level KD)
 7. eval        forced-choice scene and VQA answers, greedy captions, image-free baselines, teacher agreement

The table prints every number with its standard error beside the image-free baselines, then the verdict (which
one seed cannot decide). An interrupted demo continues where it stopped (run it again). ``--quick`` shrinks
everything to a few minutes (part of the test suite); ``--conditions paper,unlabelled,ambiguous`` runs more of the
design. ``make repro`` runs the 5-seed experiment with paired tests. Exit code 0 when every step succeeded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kd_pipeline.repro.__main__ import main as repro_main
from kd_pipeline.repro.tasks import WORLD_OF, SeedPaths

TABLE8_ARMS = ("teacher", "A", "E")


def efficiency_table(out: Path, seed: int, condition: str) -> str:
    """Table 8 for the teacher, the student alone (A) and the distilled student (E): parameters (the paper's count)
    and forward FLOPs of one image + 64 text tokens."""
    paths = SeedPaths(out / f"seed{seed}")
    lines = ["| model | parameters, paper's count (M) | forward FLOPs, 1 image + 64 tokens (G) |", "|---|---:|---:|"]
    for arm in TABLE8_ARMS:
        evaluation = paths.teacher_eval(WORLD_OF[condition]) if arm == "teacher" else paths.eval(condition, arm)
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
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the world and the runs (default 0: not one of the experiment's seeds)")
    parser.add_argument("--conditions", default="unlabelled", help="conditions to run (default unlabelled)")
    parser.add_argument("--jobs", type=int, default=2, help="steps run at once (default 2)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    status = repro_main(["--out", str(out), "--seed-list", str(args.seed), "--conditions", args.conditions,
                         "--jobs", str(args.jobs), "--results", str(out / "results.json"),
                         *(["--quick"] if args.quick else [])])
    if status == 0:
        first = args.conditions.split(",")[0].strip()
        print("\nTable 8 (efficiency)\n" + efficiency_table(out, args.seed, first))
        print(f"\nResults: {out / 'results.json'}; tables: {out / 'report.md'}. One seed cannot say whether the "
              "distillation works: `make repro` runs the 5-seed experiment with paired tests.")
    return status


if __name__ == "__main__":
    sys.exit(main())
