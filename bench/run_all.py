"""``make bench``: every benchmark in bench/, each in its own process, one after another (they measure ratios side
by side inside one run, so the shared machine's noise cancels within each). Each writes JSON to bench/results/ and
prints its table; this runner prints them in order and a summary of which succeeded.

    python -m bench.run_all [--quick] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SCRIPTS = ["bench_sharding", "bench_loader", "bench_kd_loss", "bench_sampler", "bench_step_overhead"]


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
    return 0 if all(code == 0 for code, _ in outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
