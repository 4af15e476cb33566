"""Start-up of a tiny training run: seconds from launch to the first optimizer step, and where they go.

What is measured, per launch of ``python -m kd_pipeline.train --config configs/tiny_cpu.yaml`` (1 rank, CPU,
``train.max_steps=2``, no validation) on a small synthetic data set made here:
- ``first_step_s``: wall seconds from the launch to the first line of ``metrics.jsonl`` (written after step 1);
- ``cpu_s``: user + system CPU seconds of the whole process (steady under machine load, unlike wall time);
- the import share: one extra launch under ``python -X importtime``, its import time summed by top-level package.

With ``--baseline TREE`` (another checkout, e.g. ``git worktree add /tmp/base <rev>``) both trees run alternately,
``--repeats`` times each, in this one process, and the table gives medians and the ratio current / baseline: the
shared machine's load changes both alike. DeepSpeed's JIT ops are built once before timing (its own cache).

Runbook (from the repository root):
    .venv/bin/python bench/bench_startup.py --quick                         # 1 repeat, current tree only
    .venv/bin/python bench/bench_startup.py --baseline /tmp/base --repeats 5  # -> bench/results/startup_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
POLL_SECONDS = 0.02


def make_data(folder: Path) -> dict[str, Path]:
    """Synthetic instructions sharded (train + val), and a tokenizer trained on them (no download)."""
    from data_prep.__main__ import main as data_prep

    steps = [["synth", "--out", str(folder / "synth"), "--num", "120", "--seed", "0", "--bench-num", "4"],
             ["shard", "--instruct", str(folder / "synth" / "instruct.json"), "--images",
              str(folder / "synth" / "images"), "--out", str(folder / "shards"), "--val-fraction", "0.1",
              "--max-shard-samples", "40", "--workers", "1"],
             ["tokenizer", "--instruct", str(folder / "synth" / "instruct.json"), "--out", str(folder / "tokenizer"),
              "--vocab-size", "600"]]
    for argv in steps:
        if data_prep(argv) != 0:
            raise SystemExit(f"data_prep {argv[0]} failed")
    return {"shards": folder / "shards", "tokenizer": folder / "tokenizer"}


def command(data: dict[str, Path], output_dir: Path, *python_flags: str) -> list[str]:
    return [sys.executable, *python_flags, "-m", "kd_pipeline.train", "--config",
            str(ROOT / "configs" / "tiny_cpu.yaml"), f"data.shards={data['shards']}",
            f"data.tokenizer={data['tokenizer']}", f"run.output_dir={output_dir}", "train.max_steps=2",
            "train.eval_every=0", "checkpoint.every_steps=1000000"]


def environment(tree: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(tree), "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def launch(tree: Path, data: dict[str, Path], output_dir: Path) -> dict[str, float]:
    """One run: wall seconds to the first metrics line, and the process's CPU seconds (wait4's rusage)."""
    metrics = output_dir / "metrics.jsonl"
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / "stderr.txt", "w") as stderr:
        start = time.perf_counter()
        process = subprocess.Popen(command(data, output_dir), cwd=tree, env=environment(tree),
                                   stdout=subprocess.DEVNULL, stderr=stderr)
        first_step = None
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if first_step is None and metrics.is_file() and metrics.stat().st_size:
                first_step = time.perf_counter() - start
            if pid:
                break
            time.sleep(POLL_SECONDS)
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if process.returncode != 0 or first_step is None:
        raise SystemExit(f"training in {tree} failed ({process.returncode}):\n"
                         f"{(output_dir / 'stderr.txt').read_text()[-3000:]}")
    return {"first_step_s": first_step, "cpu_s": usage.ru_utime + usage.ru_stime}


def import_shares(tree: Path, data: dict[str, Path], output_dir: Path) -> dict[str, float]:
    """Seconds of import time per top-level package (self times summed), from ``python -X importtime``."""
    result = subprocess.run(command(data, output_dir, "-X", "importtime"), cwd=tree, env=environment(tree),
                            capture_output=True, text=True)
    per_package: dict[str, float] = defaultdict(float)
    for line in result.stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+\d+ \|(\s*)(\S+)", line)
        if match:
            per_package[match.group(3).split(".")[0]] += int(match.group(1)) / 1e6
    return dict(sorted(per_package.items(), key=lambda item: -item[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, help="another checkout to compare with (run alternately)")
    parser.add_argument("--repeats", type=int, default=3, help="launches per tree (default 3)")
    parser.add_argument("--quick", action="store_true", help="one launch per tree, no importtime breakdown")
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    trees = {"current": ROOT, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as scratch:
        scratch = Path(scratch)
        data = make_data(scratch / "data")
        launch(ROOT, data, scratch / "warm-up")  # builds/loads DeepSpeed's ops and fills the page cache
        runs: dict[str, list[dict]] = {name: [] for name in trees}
        for repeat in range(repeats):
            for name, tree in trees.items():
                runs[name].append(launch(tree, data, scratch / f"{name}-{repeat}"))
                print(f"{name} run {repeat + 1}/{repeats}: {runs[name][-1]}", flush=True)
        shares = {} if args.quick else import_shares(ROOT, data, scratch / "importtime")
    summary = {name: {key: statistics.median(run[key] for run in values) for key in ("first_step_s", "cpu_s")}
               for name, values in runs.items()}
    print(f"\n{'tree':<10}{'first step (s)':>16}{'CPU (s)':>10}")
    for name, values in summary.items():
        print(f"{name:<10}{values['first_step_s']:>16.2f}{values['cpu_s']:>10.2f}")
    if "baseline" in summary:
        ratios = {key: summary["current"][key] / summary["baseline"][key] for key in ("first_step_s", "cpu_s")}
        print(f"{'ratio':<10}{ratios['first_step_s']:>16.2f}{ratios['cpu_s']:>10.2f}   (current / baseline)")
        summary["ratio_current_over_baseline"] = ratios
    if shares:
        total = sum(shares.values())
        print(f"\nimport time of the current tree: {total:.1f} s in all (-X importtime, self times by package)")
        for package, seconds in list(shares.items())[:8]:
            print(f"  {package:<16}{seconds:6.2f} s  {100 * seconds / total:4.0f}%")
    if not args.quick:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        payload = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                               "load_average": os.getloadavg()},
                   "repeats": repeats, "runs": runs, "median": summary, "import_seconds_by_package": shares,
                   "trees": {name: str(tree) for name, tree in trees.items()}}
        (RESULTS_DIR / "startup_cpu.json").write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
