"""``make gpu-check``: the prepared device check, one run of about 8 minutes on one H100/H200-class GPU.

Parts, in order of importance, each in its own process with its own time limit inside one overall budget (a part
that would overrun is stopped and reported as ``timeout``; the rest still run while budget is left):

1. ``gpu_tier``: ``pytest -m gpu tests`` (Triton kernels and fused losses vs fp64 on CUDA, bf16 tolerances, the
   sampler CUDA vs CPU, one batch CUDA vs CPU, packed vs padded with sdpa and flash-attn, 1-GPU stage-1 and stage-2
   runs) -> ``gpu_tier_cuda.json`` (counts, and every failure with its message);
2. ``stage1_mfu``: ``bench_stage1_mfu.py --device cuda`` (1.3B teacher, 0.5B student at 504 px, bf16, padded vs
   packed) -> ``stage1_mfu_cuda.json``;
3. ``kd_loss``: ``bench_kd_loss.py --device cuda`` (plain vs fused chunked/Triton vs TRL vs Liger-Kernel's fused
   linear JSD, side by side; a peer that cannot be imported is reported with the import error) ->
   ``kd_loss_cuda.json``;
4. ``sampler``: ``bench_sampler.py --device cuda`` -> ``sampler_cuda.json``.

Every JSON it leaves in ``--results`` (default bench/results) gets a ``gpu_check`` entry naming the device, torch
and CUDA versions and the date; ``gpu_check_cuda.json`` sums up the parts (status, seconds, files, log tail) and each
part's full output goes to ``logs/<part>.log`` beside it. Without CUDA it refuses to run; ``--dry-run`` instead
runs the same orchestration on the CPU with tiny stand-ins (the tier collected and skipped, the CPU paths of the
benchmarks at tiny sizes, the MFU code with ``--tiny``) and writes ``*_cpu_dry.json``: that is what the tests run.

    python -m bench.gpu_check                   # on the GPU machine (make gpu-check)
    python -m bench.gpu_check --dry-run --results /tmp/check   # on any machine
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("gpu_check")
BUDGET_S = 480  # 8 minutes


@dataclass(frozen=True)
class Part:
    name: str
    arguments: tuple[str, ...]  # after the python executable
    limit_s: int                # its own ceiling; the remaining budget may cut it shorter
    output: str                 # the JSON file it leaves in the results folder


def plan_parts(results: Path, dry_run: bool) -> list[Part]:
    """The parts of one check. ``dry_run``: CPU stand-ins at tiny sizes with the same outputs, suffixed _cpu_dry."""
    suffix = "cpu_dry" if dry_run else "cuda"
    device = "cpu" if dry_run else "cuda"

    def out(stem: str) -> str:
        return str(results / f"{stem}_{suffix}.json")

    # Four pytest-xdist workers, one test file each at a time: the 1-GPU runs (the longest file) overlap the kernel
    # and sampler tests; the tiny models leave the GPU plenty of room for all four.
    tier = ["-m", "pytest", "-q", "-m", "gpu", "-rs", "-p", "no:cacheprovider", "-n", "4", "--dist", "loadfile",
            "--junitxml", str(results / "logs" / f"gpu_tier_{suffix}.xml"), "tests/gpu" if dry_run else "tests"]
    mfu = ["bench/bench_stage1_mfu.py", "--device", device, "--output", out("stage1_mfu")]
    kd_loss = ["bench/bench_kd_loss.py", "--device", device, "--output", out("kd_loss")]
    sampler = ["bench/bench_sampler.py", "--device", device, "--output", out("sampler")]
    if dry_run:
        mfu += ["--tiny", "--warmup", "1", "--steps", "1", "--micro-batch-size", "2"]
        kd_loss += ["--dtype", "fp32", "--hidden", "32", "--vocab", "1000", "--n", "64", "--repeats", "1"]
        sampler += ["--quick", "--skip-zero3", "--repeats", "1"]
    else:
        kd_loss += ["--dtype", "bf16", "--hidden", "4096", "--n", "8192", "--repeats", "3"]
    return [Part("gpu_tier", tuple(tier), 270, out("gpu_tier")),
            Part("stage1_mfu", tuple(mfu), 150, out("stage1_mfu")),
            Part("kd_loss", tuple(kd_loss), 120, out("kd_loss")),
            Part("sampler", tuple(sampler), 120, out("sampler"))]


def tier_summary(junit_xml: Path) -> dict:
    """Counts and failures of a pytest run from its JUnit XML."""
    suite = ElementTree.parse(junit_xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    cases, failures, skipped = 0, [], {}
    for case in suite.iter("testcase"):
        cases += 1
        name = f"{case.get('classname')}::{case.get('name')}"
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is not None:
            failures.append({"test": name, "message": (problem.get("message") or "")[:2000]})
        elif case.find("skipped") is not None:
            reason = case.find("skipped").get("message") or ""
            skipped[reason] = skipped.get(reason, 0) + 1
    return {"tests": cases, "failed": len(failures), "skipped": sum(skipped.values()),
            "passed": cases - len(failures) - sum(skipped.values()), "skip_reasons": skipped, "failures": failures}


def device_record() -> dict:
    cuda = torch.cuda.is_available()
    return {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
            "cuda": torch.version.cuda, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def annotate(path: Path, record: dict) -> None:
    """Add the ``gpu_check`` entry (device, versions, date) to a JSON object a part wrote."""
    payload = json.loads(path.read_text())
    if isinstance(payload, dict):
        payload["gpu_check"] = record
        path.write_text(json.dumps(payload, indent=2) + "\n")


def run_part(part: Part, limit_s: float, log_file: Path, env: dict) -> dict:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with log_file.open("w") as sink:
        process = subprocess.Popen([sys.executable, *part.arguments], cwd=REPO_ROOT, env=env, stdout=sink,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = process.wait(timeout=limit_s)
            status = "ok" if returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)  # the part and whatever it started (pytest's torchrun children)
            process.wait()
            returncode, status = None, "timeout"
    tail = log_file.read_text(errors="replace")[-3000:]
    return {"status": status, "returncode": returncode, "seconds": round(time.monotonic() - start, 1),
            "limit_s": round(limit_s), "log": str(log_file), "log_tail": tail}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=REPO_ROOT / "bench" / "results",
                        help="folder for the JSON results (and logs/)")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all parts together")
    parser.add_argument("--only", nargs="*", choices=("gpu_tier", "stage1_mfu", "kd_loss", "sampler"),
                        help="run only these parts")
    parser.add_argument("--dry-run", action="store_true", help="CPU stand-ins at tiny sizes (no GPU needed)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device, so there is nothing to measure; run it on the GPU machine "
              "(make gpu-check), or use --dry-run to exercise this script on the CPU", file=sys.stderr)
        return 2
    results = args.results.resolve()
    results.mkdir(parents=True, exist_ok=True)
    record = device_record()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    if args.dry_run:
        env["DS_ACCELERATOR"] = "cpu"
    elif env.get("DS_ACCELERATOR") == "cpu":
        log.warning("DS_ACCELERATOR=cpu was set: dropped, the check is about the GPU")
        env.pop("DS_ACCELERATOR")
    log.info("gpu_check on %s (torch %s, CUDA %s), budget %.0f s", record["device"], record["torch"],
             record["cuda"], args.budget)
    deadline = time.monotonic() + args.budget
    summary = {**record, "dry_run": args.dry_run, "budget_s": args.budget, "parts": {}}
    for part in plan_parts(results, args.dry_run):
        if args.only and part.name not in args.only:
            continue
        remaining = deadline - time.monotonic()
        if remaining < 10:
            summary["parts"][part.name] = {"status": "skipped", "reason": "the time budget was spent"}
            log.warning("%s: skipped, the budget is spent", part.name)
            continue
        log.info("%s: starting (limit %.0f s of %.0f s left)", part.name, min(part.limit_s, remaining), remaining)
        outcome = run_part(part, min(part.limit_s, remaining), results / "logs" / f"{part.name}.log", env)
        output = Path(part.output)
        if part.name == "gpu_tier" and (results / "logs" / output.name.replace(".json", ".xml")).is_file():
            tier = tier_summary(results / "logs" / output.name.replace(".json", ".xml"))
            output.write_text(json.dumps({**tier, "command": "pytest -m gpu"}, indent=2) + "\n")
            outcome["tests"] = {key: tier[key] for key in ("tests", "passed", "failed", "skipped")}
        if output.is_file():
            annotate(output, record)
            outcome["output"] = str(output)
        summary["parts"][part.name] = outcome
        log.info("%s: %s in %.0f s%s", part.name, outcome["status"], outcome["seconds"],
                 f" ({outcome['tests']})" if "tests" in outcome else "")
    summary_path = results / f"gpu_check_{'cpu_dry' if args.dry_run else 'cuda'}.json"
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    failed = [name for name, outcome in summary["parts"].items() if outcome["status"] != "ok"]
    log.info("written %s; %s", summary_path, f"not ok: {', '.join(failed)}" if failed else "every part ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
