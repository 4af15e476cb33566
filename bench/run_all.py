"""``make bench``: every benchmark in bench/, each in its own process, one after another (they measure ratios side
by side inside one run, so the shared machine's noise cancels within each). Each writes JSON to bench/results/ and
prints its table; this runner prints them in order, a summary of which succeeded, and the headline ratios read
back from the JSON files (the numbers the README's benchmark table quotes).

    python -m bench.run_all [--quick] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SCRIPTS = ["bench_sharding", "bench_loader", "bench_kd_loss", "bench_sampler", "bench_step_overhead",
           "bench_stage2_profile"]


def _sharding_headlines(result: dict) -> list[str]:
    return [f"shard vs tar throughput: {result['shard_throughput_vs_tar']}x wall, "
            f"{result['shard_cpu_throughput_vs_tar']}x CPU time ({result['workers']} workers; 1.0 = as fast as tar)"]


def _kd_loss_headlines(result: dict) -> list[str]:
    largest = max(result["config"]["n"])
    lines = []
    for row in result["summary"]:
        if row["n"] == largest and "fused" in row["method"] and "wall_vs_plain" in row:
            time_key = "cpu_vs_plain" if row.get("cpu_vs_plain") is not None else "wall_vs_plain"
            peak = "peak not resolved" if row["peak_vs_plain"] is None else f"{row['peak_vs_plain']:.3f}x peak memory"
            lines.append(f"{row['method']} / plain at N={largest}: {row[time_key]:.3f}x {time_key.split('_')[0]} "
                         f"time, {peak}")
    return lines


# script -> (results file, or with --quick its _quick twin, and the lines it contributes to the summary)
HEADLINES = {
    "bench_sharding": ("sharding_cpu", _sharding_headlines),
    "bench_kd_loss": ("kd_loss_cpu", _kd_loss_headlines),
}


def print_headlines(names: list[str], quick: bool) -> None:
    """Headline ratios of the benchmarks that ran, from their JSON results."""
    print("\n==== headline ratios ====")
    for name in names:
        if name not in HEADLINES:
            continue
        stem, headlines = HEADLINES[name]
        path = BENCH / "results" / f"{stem}{'_quick' if quick else ''}.json"
        try:
            lines = headlines(json.loads(path.read_text()))
        except (OSError, KeyError, ValueError) as error:
            lines = [f"no result in {path.name} ({type(error).__name__}: {error})"]
        for line in lines:
            print(f"{name:<22} {line}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    parser.add_argument("--only", nargs="*", choices=SCRIPTS, help="run only these")
    args = parser.parse_args(argv)
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "PYTHONUNBUFFERED": "1"}
    outcomes = {}
    for name in args.only or SCRIPTS:
        print(f"\n==== {name} ====", flush=True)
        start = time.perf_counter()
        command = [sys.executable, str(BENCH / f"{name}.py")] + (["--quick"] if args.quick else [])
        result = subprocess.run(command, cwd=BENCH.parent, env=env)
        outcomes[name] = (result.returncode, time.perf_counter() - start)
    print("\n==== summary ====")
    for name, (code, seconds) in outcomes.items():
        print(f"{name:<22} {'ok' if code == 0 else f'FAILED ({code})':<12} {seconds:7.0f} s")
    print_headlines(list(outcomes), args.quick)
    return 0 if all(code == 0 for code, _ in outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
