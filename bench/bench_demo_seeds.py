"""Does distilling beat training the small model alone? The demo at several seeds, headline metrics side by side.

    python bench/bench_demo_seeds.py [--seeds 0 1 2] [--scale cpu|quick|gpu] [--out bench_out/demo_seeds]

Runs ``python -m kd_pipeline.demo --seed S`` (a new synthetic world, new models, new distillation per seed; an
interrupted seed continues where it stopped), reads each ``eval/results.json`` and prints, per task, the teacher,
the baseline student and the distilled student as mean +- standard deviation over seeds, and on how many tasks the
distilled student's mean beats the baseline's. Not part of ``make bench`` (about one demo per seed: ~45 minutes on 2
CPU cores); writes bench/results/demo_seeds_<scale>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADLINE = {"aid": ("scene OA", "oa"), "lrben": ("VQA mOA", "moa"), "referring": ("grounding acc@0.5", "acc@0.5"),
            "region_captioning": ("captioning ROUGE-L", "rougeL")}
MODELS = ("teacher", "baseline", "distilled")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--scale", choices=("quick", "cpu", "gpu"), default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out" / "demo_seeds")
    args = parser.parse_args(argv)
    per_seed = {}
    for seed in args.seeds:
        out = args.out / f"seed{seed}"
        command = [sys.executable, "-m", "kd_pipeline.demo", "--out", str(out), "--seed", str(seed),
                   *(["--quick"] if args.scale == "quick" else ["--scale", args.scale])]
        if subprocess.run(command, cwd=ROOT).returncode != 0:
            print(f"seed {seed}: the demo failed; see {out / 'logs'}", file=sys.stderr)
            return 1
        per_seed[seed] = json.loads((out / "eval" / "results.json").read_text())
    summary, wins = {}, 0
    print(f"{'task':<22}" + "".join(f"{name:>20}" for name in MODELS))
    for task, (label, key) in HEADLINE.items():
        row = {}
        for model in MODELS:
            values = [100 * per_seed[seed][model][task][key] for seed in args.seeds]
            row[model] = {"mean": statistics.mean(values),
                          "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}
        summary[label] = row
        wins += row["distilled"]["mean"] > row["baseline"]["mean"]
        print(f"{label:<22}" + "".join(f"{row[m]['mean']:>13.2f} ± {row[m]['std']:<5.2f}" for m in MODELS))
    print(f"distilled beats baseline on {wins} of {len(HEADLINE)} headline metrics (seeds {args.seeds})")
    result = {"seeds": args.seeds, "scale": args.scale, "metrics": summary, "distilled_wins": wins}
    (ROOT / "bench" / "results" / f"demo_seeds_{args.scale}.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
