"""``python -m kd_pipeline.repro`` (``make repro``): does the distillation beat training the student alone?

Runbook::

    make repro                                    # design 2: 5 seeds x 3 conditions -> bench/results/repro_cpu.json
    python -m kd_pipeline.repro --out repro_out --jobs 2 --results bench/results/repro_cpu.json
    python -m kd_pipeline.repro --out /tmp/r --quick   # minutes: the machinery at toy sizes (the test suite's)
    python -m kd_pipeline.repro --out d --seed-list 0 --conditions unlabelled --arms E,F   # a subset (+ what it needs)
    python -m kd_pipeline.repro --out repro_out --report-only     # re-collect the table from what has run

An interrupted run continues where it stopped: run the same command again (completed tasks are skipped, a cut
training run resumes from its checkpoint). The experiment's design and pass rule are in kd_pipeline/repro/design.py
and were fixed before any number was seen; the output states plainly whether the rule held. ``--out`` records the
design version and scale it was started with (``<out>/design.json``): a folder or a ``--results`` file written by
another version or scale is refused, so no JSON ever mixes the results of two designs.

Output: ``--results`` (JSON: the design, per seed / condition / arm / metric the value and its standard error, the
image-free baselines, the paired differences with p-values, the world checks, timings and the verdict);
``<out>/report.md`` (the tables) and ``<out>/paired_differences.png``.
Exit status: 0 when every task ran (whatever the verdict), 1 when a task failed (its log is named), 2 bad input
(an unknown condition or arm, a folder or results file of another design or scale: one line on stderr).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

from kd_pipeline.repro import design, report
from kd_pipeline.repro.runner import Runner, TaskFailed
from kd_pipeline.repro.tasks import WORLD_OF, SeedPaths, SeedTasks, with_dependencies

DESIGN_RECORD = "design.json"

log = logging.getLogger("kd_pipeline.repro")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kd_pipeline.repro", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", type=Path, default=Path("repro_out"), help="working folder (re-used to continue)")
    parser.add_argument("--seeds", type=int, default=len(design.DEFAULT_SEEDS),
                        help=f"number of the design's seeds {design.DEFAULT_SEEDS} to run, from the first (5)")
    parser.add_argument("--seed-list", default=None, help="explicit comma-separated seeds (overrides --seeds)")
    parser.add_argument("--conditions", default=",".join(design.CONDITIONS),
                        help=f"comma-separated subset of {','.join(design.CONDITIONS)}")
    parser.add_argument("--arms", default=",".join(design.ARMS),
                        help=f"comma-separated subset of {','.join(design.ARMS)} (the arms they start from are "
                             "trained too; each condition runs the ones it has)")
    parser.add_argument("--scale", choices=sorted(design.SCALES), default="cpu", help="cpu (the experiment) or quick")
    parser.add_argument("--quick", action="store_true", help="same as --scale quick")
    parser.add_argument("--jobs", type=int, default=2, help="tasks run at once (one CPU process each; default 2)")
    parser.add_argument("--results", type=Path, default=None, help="results JSON (default <out>/results.json)")
    parser.add_argument("--report-only", action="store_true", help="collect and report what has run; train nothing")
    return parser.parse_args(argv)


def collect(out: Path, seeds: list[int], conditions: tuple[str, ...], arms: tuple[str, ...]) -> dict:
    """{seed: {condition: {arm | teacher | image_free: {metric: {value, se}}}}} from the evaluation files that
    exist (a seed with a missing file is left out of the summary and listed under "incomplete")."""
    per_seed: dict[str, dict] = {}
    for seed in seeds:
        paths = SeedPaths(out / f"seed{seed}")
        entry: dict[str, dict] = {}
        for condition in conditions:
            files = {arm: paths.eval(condition, arm) for arm in design.condition_arms(condition) if arm in arms}
            files["teacher"] = paths.teacher_eval(WORLD_OF[condition])
            files["image_free"] = paths.eval(condition, "image_free")
            if not all(path.is_file() for path in files.values()):
                break
            entry[condition] = {arm: (report.extract_image_free if arm == "image_free" else report.extract)(
                json.loads(path.read_text())) for arm, path in files.items()}
        else:
            per_seed[str(seed)] = entry
    return per_seed


TIME_KINDS = (  # where a seed's time goes, by a task's name after "seedN." (first match wins)
    ("pseudo-labels (eval label + shard)", lambda name: "set_ab_G" in name),
    ("data (worlds, sets, D_PT, benchmarks)", lambda name: name.partition(".")[2].startswith(
        ("world_", "tokenizer", "set_", "pt_", "bench_"))),
    ("teachers", lambda name: name.endswith(".teacher")),
    ("evaluation", lambda name: ".eval" in name or name.endswith((".teacher_eval", ".image_free"))),
    ("A, N (students alone)", lambda name: name.endswith((".A", ".N"))),
    ("C, Pc, D, D_al (stage 1's length)", lambda name: name.endswith((".C", ".Pc", ".D", ".D_al"))),
    ("E, E0, E_ss (stage 2)", lambda name: name.endswith((".E", ".E0", ".E_ss"))),
    ("F, G (cross-entropy on stage 2's schedule)", lambda name: name.endswith((".F", ".G"))),
)


def time_by_kind(tasks: dict[str, float]) -> dict[str, float]:
    """{kind: seconds} of one seed's task times (``TIME_KINDS``; anything else under "other")."""
    totals: dict[str, float] = {}
    for name, seconds in tasks.items():
        kind = next((kind for kind, matches in TIME_KINDS if matches(name)), "other")
        totals[kind] = totals.get(kind, 0.0) + seconds
    return totals


def timings(runner: Runner, seeds: list[int]) -> dict:
    """Per seed: the sum of its tasks' run times (process time at ``--jobs`` processes), the same by kind of task,
    and the wall-clock span from its first task's start to its last task's end (seeds overlap when a seed's last
    tasks run beside the next's)."""
    markers = runner.timings()
    by_seed = {}
    for seed in seeds:
        mine = {name: marker for name, marker in markers.items() if marker.get("group") == f"seed{seed}"}
        ends = [time.mktime(time.strptime(marker["finished"], "%Y-%m-%dT%H:%M:%S")) for marker in mine.values()]
        starts = [end - marker["seconds"] for end, marker in zip(ends, mine.values())]
        by_seed[f"seed{seed}"] = {"task_seconds_sum": sum(marker["seconds"] for marker in mine.values()),
                                  "wall_seconds_span": max(ends) - min(starts) if ends else None,
                                  "by_kind": {kind: round(seconds, 1) for kind, seconds in time_by_kind(
                                      {name: marker["seconds"] for name, marker in mine.items()}).items()},
                                  "tasks": {name: round(marker["seconds"], 1) for name, marker in mine.items()}}
    return by_seed


def _names(text: str, known: tuple[str, ...], what: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise ValueError(f"--{what} {text!r}: unknown {', '.join(unknown) or '(none given)'}; known: "
                         f"{', '.join(known)}")
    return names


def check_design_record(out: Path, results_path: Path, record: dict) -> None:
    """Refuse an output folder or results file of another design version or scale (ValueError, one line)."""
    marker = out / DESIGN_RECORD
    if marker.is_file():
        found = json.loads(marker.read_text())
        if (found.get("version"), found.get("scale")) != (record["version"], record["scale"]):
            raise ValueError(f"{out} holds a run of design {found.get('version')} at the {found.get('scale')!r} scale; "
                             f"this is design {record['version']} at {record['scale']!r}: choose another --out")
    if results_path.is_file():
        try:
            found = json.loads(results_path.read_text()).get("design", {})
        except (json.JSONDecodeError, AttributeError):
            raise ValueError(f"--results {results_path} is not a results JSON: choose another --results") from None
        if (found.get("version"), found.get("scale")) != (record["version"], record["scale"]):
            raise ValueError(f"--results {results_path} holds design {found.get('version')} at the "
                             f"{found.get('scale')!r} scale; this is design {record['version']} at "
                             f"{record['scale']!r}: move that file or choose another --results")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    scale_name = "quick" if args.quick else args.scale
    scale = design.SCALES[scale_name]
    out = args.out.resolve()
    results_path = args.results or out / "results.json"
    try:
        conditions = _names(args.conditions, design.CONDITIONS, "conditions")
        arms = with_dependencies(_names(args.arms, design.ARMS, "arms"))
        if args.seeds < 1 or args.jobs < 1:
            raise ValueError(f"--seeds {args.seeds} and --jobs {args.jobs} must be at least 1")
        try:
            seeds = ([int(seed) for seed in args.seed_list.split(",")] if args.seed_list
                     else list(design.DEFAULT_SEEDS[:args.seeds]))
        except ValueError:
            raise ValueError(f"--seed-list {args.seed_list!r} must be comma-separated integers") from None
        if args.seeds > len(design.DEFAULT_SEEDS) and not args.seed_list:
            raise ValueError(f"--seeds {args.seeds}: the design registers {len(design.DEFAULT_SEEDS)} seeds "
                             f"{design.DEFAULT_SEEDS}; give others with --seed-list")
        record = {"version": design.DESIGN_VERSION, "scale": scale_name}
        check_design_record(out, results_path, record)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not args.report_only:
        out.mkdir(parents=True, exist_ok=True)
        (out / DESIGN_RECORD).write_text(json.dumps(record))
    runner = Runner(state_dir=out / "state", log_dir=out / "logs", jobs=args.jobs,
                    env={"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.jobs))})
    tasks = [task for seed in seeds for task in SeedTasks(runner, scale, seed, out, conditions, arms).build()]
    started = time.time()

    def write(final: bool) -> dict | None:
        """Collect every complete seed into the results JSON (after each evaluation, and at the end)."""
        payload = results_payload(out, seeds, conditions, arms, scale_name, scale, runner, args.jobs, started)
        report.write_results(results_path, payload)
        if final and "summary" in payload:
            text = report.markdown(payload["summary"])
            (out / "report.md").write_text(text + "\n")
            report.plot(payload["summary"], out / "paired_differences.png")
            print(text)
        return payload

    def after_task(task) -> None:
        if ".eval" in task.name:
            write(final=False)

    status = 0
    if not args.report_only:
        log.info("%d tasks for %d seed(s) x %s at the %s scale, %d at a time; logs in %s", len(tasks), len(seeds),
                 ",".join(conditions), scale_name, args.jobs, out / "logs")
        try:
            runner.run(tasks, on_done=after_task)
        except TaskFailed as error:
            log.error("stopped: %s\nrun the same command again to continue", error)
            status = 1
    write(final=True)
    log.info("results: %s", results_path)
    return status


def results_payload(out: Path, seeds: list[int], conditions: tuple[str, ...], arms: tuple[str, ...],
                    scale_name: str, scale, runner: Runner, jobs: int, started: float) -> dict:
    per_seed = collect(out, seeds, conditions, arms)
    payload = {"design": {"version": design.DESIGN_VERSION, "scale": scale_name,
                          "scale_values": dataclasses.asdict(scale), "seeds": seeds, "conditions": conditions,
                          "arms": {condition: [arm for arm in design.condition_arms(condition) if arm in arms]
                                   for condition in conditions},
                          "comparisons": {condition: design.condition_comparisons(condition)
                                          for condition in conditions},
                          "primary_metric": design.PRIMARY_METRIC, "alpha": design.ALPHA,
                          "pass_rule": design.pass_rule_text(),
                          "recipes": {"stage1_lr": design.STAGE1_LR, "kd_alpha": design.KD_ALPHA,
                                      "kd_temperature": design.KD_TEMPERATURE,
                                      "stage1_align_weight": 0.0,
                                      "stage1_align_weight_ablation": design.STAGE1_ALIGN_WEIGHT_ABLATION,
                                      "stage2_align_weight": design.STAGE2_ALIGN_WEIGHT,
                                      "stage2_lr": scale.stage2_lr, "stage2_steps": scale.stage2_steps,
                                      "labelled_share": scale.labelled_share}},
               "pilot": pilot_choice(),
               "per_seed": per_seed, "incomplete_seeds": [seed for seed in seeds if str(seed) not in per_seed],
               "timings": timings(runner, seeds), "wall_seconds_this_invocation": time.time() - started,
               "machine": {"cpus": os.cpu_count(), "jobs": jobs}}
    if per_seed:
        payload["summary"] = report.summarise(per_seed, conditions)
    return payload


def pilot_choice() -> dict | None:
    """The pilot's committed choice (bench/results/repro_pilot_cpu.json), carried into every results JSON."""
    from kd_pipeline.repro.runner import ROOT

    path = ROOT / "bench" / "results" / "repro_pilot_cpu.json"
    return json.loads(path.read_text()).get("choice") if path.is_file() else None


if __name__ == "__main__":
    sys.exit(main())
