"""``python -m kd_pipeline.repro.pilot``: design 2's choices made on a pilot world, before any experiment seed runs.

Runbook::

    python -m kd_pipeline.repro.pilot --out pilot_out --results bench/results/repro_pilot_cpu.json   # ~30 min, 2 cores
    python -m kd_pipeline.repro.pilot --out /tmp/p --quick          # the machinery at toy sizes (the test suite's)

On world ``design.PILOT_SEED`` (not an experiment seed), in the ``unlabelled`` condition, two choices are made by
rules fixed here, each from the pilot's own numbers and nothing else:

1. **The labelled share.** For each share of ``SHARES`` the arms A, C and Pc are trained and evaluated; the
   chosen share is the largest whose Pc - C on the primary metric (scene accuracy, forced choice) is at least
   ``MIN_LABEL_GAIN`` (3 points): small enough that labels matter, as large as allows. If none qualifies, the
   smallest share is taken and the shortfall reported.
2. **The stage-2 budget.** At the chosen share, D is trained and each (learning rate, steps) of ``GRID`` runs stage 2
   from it (E's recipe: rollouts from all of S's prompts, 64 sequences per step, 4 PPO epochs). The chosen point is
   the one whose best validation per-token reverse KL(q||p) is lowest; it must be at least ``MIN_KL_REDUCTION``
   (10 %) below D's own (the value at step 0). If no point is, the telemetry of the best one (reward, per-token
   reverse KL, advantage-clip fraction, importance weights, each term's size) is written beside the curves, so the
   cause can be read before any seed runs.

Output: ``--results`` (JSON: per share its A / C / Pc scores and Pc - C, per grid point its validation curve and
telemetry, and ``choice``), ``<out>/pilot_curves.png``. ``kd_pipeline/repro/design.py``'s cpu scale must carry
``choice`` (a test checks that it does). Resumable like ``make repro``: run the same command again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from kd_pipeline.repro import design, report
from kd_pipeline.repro.runner import Runner, Task, TaskFailed
from kd_pipeline.repro.tasks import SeedTasks, share_name

log = logging.getLogger("kd_pipeline.repro.pilot")

SHARES = (0.25, 0.125, 0.0625)
MIN_LABEL_GAIN = 0.03
GRID = ((3.0e-5, 100), (1.0e-4, 50), (1.0e-4, 100), (3.0e-4, 50), (3.0e-4, 100))
MIN_KL_REDUCTION = 0.10
CURVE_POINTS = 10  # validations per grid run
QUICK_GRID = ((1.0e-4, 4),)
TELEMETRY = ("reward", "rev_kl", "clip_frac", "w_mean", "w_max", "len_mixed", "loss_long_term", "loss_single_step",
             "loss_align", "loss_pt")


def share_tasks(runner: Runner, scale: design.Scale, out: Path, shares) -> list[SeedTasks]:
    return [SeedTasks(runner, dataclasses.replace(scale, labelled_share=share), design.PILOT_SEED, out,
                      ("unlabelled",), arms=("A", "C", "Pc"), variant=f"share{share_name(share)}") for share in shares]


def unique(tasks: list[Task]) -> list[Task]:
    """The tasks of several builders of one seed, each shared task (world, sets, teacher) once."""
    seen, kept = set(), []
    for task in tasks:
        if task.name not in seen:
            seen.add(task.name)
            kept.append(task)
    return kept


def read_scores(builder: SeedTasks, arms) -> dict[str, float]:
    scores = {}
    for arm in arms:
        path = builder.paths.eval("unlabelled", arm)
        if path.is_file():
            scores[arm] = report.extract(json.loads(path.read_text()))[design.PRIMARY_METRIC]["value"]
    return scores


def choose_share(results: dict[str, dict]) -> tuple[float, bool]:
    """The largest share whose Pc - C reaches MIN_LABEL_GAIN (else the smallest); and whether one did."""
    qualifying = [float(share) for share, entry in results.items() if entry["pc_minus_c"] >= MIN_LABEL_GAIN]
    if qualifying:
        return max(qualifying), True
    return min(float(share) for share in results), False


def grid_task(base: SeedTasks, lr: float, steps: int) -> tuple[Task, Path]:
    """Stage 2 from the base share's D with one (learning rate, steps); returns the task and its run folder."""
    every = max(1, steps // CURVE_POINTS)
    scale = dataclasses.replace(base.scale, stage2_lr=lr, stage2_steps=steps,
                                eval_every=(*base.scale.eval_every[:2], every))
    point = SeedTasks(base.runner, scale, design.PILOT_SEED, base.paths.root.parent, ("unlabelled",), arms=(),
                      variant=f"grid_lr{lr:g}_K{steps}")
    run_dir = point.paths.run("unlabelled", "E")
    overrides = [*point.stage2_overrides("unlabelled"), f"student.path={base.paths.model('unlabelled', 'A')}",
                 f"run.init_from={base.paths.run('unlabelled', 'D')}"]
    seed = f"seed{design.PILOT_SEED}"
    name = f"{seed}.{point.variant}.unlabelled.E"
    deps = (f"{seed}.{base.variant}.unlabelled.D", f"{seed}.set_ab_S_prompts",
            f"{seed}.pt_{base.student_set('unlabelled')}")
    return Task(name, lambda task: point._train(task, "stage2.yaml", run_dir, overrides), deps,
                group=f"seed{design.PILOT_SEED}"), run_dir


def read_curve(run_dir: Path) -> dict:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    curve = [(line["step"], line["val_loss"]) for line in lines if "val_loss" in line]
    start = curve[0][1]
    best_step, best = min(curve[1:], key=lambda point: point[1])
    telemetry = {key: [(line["step"], line[key]) for line in lines if key in line] for key in TELEMETRY}
    return {"curve": curve, "start": start, "best": best, "best_step": best_step,
            "reduction": 1.0 - best / start, "telemetry": telemetry}


def markdown(results: dict) -> tuple[str, str]:
    """README's two pilot tables (shares; stage-2 grid) from the pilot JSON, the chosen rows marked."""
    choice = results["choice"]
    shares = ["| labelled share | A | C | Pc | Pc−C |", "| --- | ---: | ---: | ---: | ---: |"]
    for share, entry in sorted(results["shares"].items(), key=lambda item: -float(item[0])):
        scores = entry["scores"]
        label = f"1/{round(1 / float(share))}" + (" (chosen)" if float(share) == choice["labelled_share"] else "")
        shares.append(f"| {label} | {100 * scores['A']:.1f} | {100 * scores['C']:.1f} | {100 * scores['Pc']:.1f} | "
                      f"{100 * entry['pc_minus_c']:+.1f} |")
    grid = ["| lr | K | best validation reverse KL (step) | vs D |", "| --- | ---: | ---: | ---: |"]
    for entry in results["grid"].values():
        chosen = (entry["lr"], entry["steps"]) == (choice["stage2_lr"], choice["stage2_steps"])
        cells = [f"{entry['lr']:g}", str(entry["steps"]), f"{entry['best']:.3f} ({entry['best_step']})",
                 f"{-100 * entry['reduction']:+.0f} %"]
        grid.append("| " + " | ".join(f"**{cell}**" if chosen else cell for cell in cells) + " |")
    return "\n".join(shares), "\n".join(grid)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (shares_axis, curves_axis) = plt.subplots(1, 2, figsize=(12, 4.2))
    shares = sorted(results["shares"], key=float, reverse=True)
    for offset, arm in enumerate(("A", "C", "Pc")):
        shares_axis.bar([index + 0.27 * (offset - 1) for index in range(len(shares))],
                        [100 * results["shares"][share]["scores"].get(arm, float("nan")) for share in shares], 0.27,
                        label=arm)
    shares_axis.set_xticks(range(len(shares)))
    shares_axis.set_xticklabels([f"share {share}: Pc - C {100 * results['shares'][share]['pc_minus_c']:+.1f}"
                                 for share in shares])
    shares_axis.set_ylabel("scene accuracy, forced choice (%)")
    shares_axis.set_ylim(bottom=max(0, min(100 * value for entry in results["shares"].values()
                                           for value in entry["scores"].values()) - 10))
    shares_axis.legend()
    shares_axis.set_title("labelled share (Pc - C >= 3 points wanted)")
    for name, entry in results["grid"].items():
        steps, values = zip(*entry["curve"])
        curves_axis.plot(steps, values, marker="o", markersize=3,
                         label=f"{name} (best {-100 * entry['reduction']:+.0f} %)")
    if results["grid"]:
        start = next(iter(results["grid"].values()))["start"]
        curves_axis.axhline(start * (1 - MIN_KL_REDUCTION), color="grey", linestyle="--", linewidth=0.8,
                            label="D's value - 10 %")
    curves_axis.set_xlabel("stage-2 step")
    curves_axis.set_ylabel("validation reverse KL(q||p) per token")
    curves_axis.set_title("stage-2 grid from D")
    curves_axis.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kd_pipeline.repro.pilot", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", type=Path, default=Path("pilot_out"), help="working folder (re-used to continue)")
    parser.add_argument("--results", type=Path, default=None, help="results JSON (default <out>/pilot.json)")
    parser.add_argument("--jobs", type=int, default=2, help="tasks run at once (default 2)")
    parser.add_argument("--quick", action="store_true", help="toy sizes: the machinery only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    scale_name = "quick" if args.quick else "cpu"
    scale, grid = design.SCALES[scale_name], QUICK_GRID if args.quick else GRID
    out, results_path = args.out.resolve(), args.results or args.out.resolve() / "pilot.json"
    runner = Runner(state_dir=out / "state", log_dir=out / "logs", jobs=args.jobs,
                    env={"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.jobs))})
    results: dict = {"design_version": design.DESIGN_VERSION, "scale": scale_name, "seed": design.PILOT_SEED,
                     "rules": {"shares": SHARES, "min_label_gain": MIN_LABEL_GAIN, "grid": grid,
                               "min_kl_reduction": MIN_KL_REDUCTION}, "shares": {}, "grid": {}}
    try:
        shares = list(SHARES[:2])  # the third only when neither of the first two qualifies
        while True:
            builders = share_tasks(runner, scale, out, shares)
            runner.run(unique([task for builder in builders for task in builder.build()]))
            for share, builder in zip(shares, builders):
                scores = read_scores(builder, ("A", "C", "Pc"))
                results["shares"][share_name(share)] = {"scores": scores, "pc_minus_c": scores["Pc"] - scores["C"]}
            chosen, qualified = choose_share(results["shares"])
            if qualified or len(shares) == len(SHARES):
                break
            shares = list(SHARES)
        base = SeedTasks(runner, dataclasses.replace(scale, labelled_share=chosen), design.PILOT_SEED, out,
                         ("unlabelled",), arms=("A", "D"), variant=f"share{share_name(chosen)}")
        points = [grid_task(base, lr, steps) for lr, steps in grid]
        runner.run(unique([*base.build(), *(task for task, _ in points)]))
    except TaskFailed as error:
        log.error("stopped: %s\nrun the same command again to continue", error)
        return 1
    for (lr, steps), (_, run_dir) in zip(grid, points):
        results["grid"][f"lr {lr:g}, K {steps}"] = {"lr": lr, "steps": steps, **read_curve(run_dir)}
    best_name = min(results["grid"], key=lambda name: results["grid"][name]["best"])
    best = results["grid"][best_name]
    results["choice"] = {"labelled_share": chosen, "label_gain_met": qualified, "stage2_lr": best["lr"],
                         "stage2_steps": best["steps"], "kl_reduction": best["reduction"],
                         "kl_reduction_met": best["reduction"] >= MIN_KL_REDUCTION}
    report.write_results(results_path, results)
    plot(results, out / "pilot_curves.png")
    log.info("choice: %s (results %s, curves %s)", results["choice"], results_path, out / "pilot_curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
