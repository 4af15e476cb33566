"""Checkpoint save time of a CPU run against a plain write of the same bytes to the same disk, side by side.

    python bench/bench_checkpoint_save.py [--steps N]

Runs the real trainer (one rank, ``configs/tiny_cpu.yaml`` as shipped and a wider LoRA student, each in a process of
its own, on a small synthetic world made with ``data_prep``) with a checkpoint after every step, and times each
``kd_pipeline.checkpoint.save_checkpoint`` call (DeepSpeed's ZeRO files, the RNG/loader files, and the sha256 of
every file for COMPLETE.json). After each save, the same number of bytes is written to the same folder with
``write`` + ``fsync`` and timed: the ratio save / plain write is how much slower than the disk a save is, which
README's operator's guide uses to size Slurm's grace time from ``plan``'s checkpoint size and the cluster's storage
bandwidth. Also compares the bytes a save wrote with ``kd_pipeline.memory``'s checkpoint formula (12 B per
trainable parameter + the frozen parameters' partitions, here fp32 on CPU). Writes
bench/results/checkpoint_save_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_prep.__main__ import main as data_prep  # noqa: E402
from kd_pipeline import checkpoint as ckpt  # noqa: E402
from kd_pipeline.config import load_config  # noqa: E402
from kd_pipeline.memory import CHECKPOINT_BYTES_PER_TRAINABLE, count_models  # noqa: E402
from kd_pipeline.train import main as train  # noqa: E402

FP32_BYTES = 4


def make_world(folder: Path) -> None:
    """``folder/shards`` and ``folder/tokenizer``: a small synthetic world made by the real data_prep commands."""
    assert data_prep(["synth", "--out", str(folder / "world"), "--num", "96", "--seed", "0", "--bench-num", "2"]) == 0
    assert data_prep(["shard", "--instruct", str(folder / "world" / "instruct.json"), "--images",
                      str(folder / "world" / "images"), "--out", str(folder / "shards"), "--val-fraction", "0.1",
                      "--max-shard-samples", "16", "--workers", "1"]) == 0
    assert data_prep(["tokenizer", "--instruct", str(folder / "world" / "instruct.json"), "--out",
                      str(folder / "tokenizer"), "--vocab-size", "600"]) == 0


def plain_write_seconds(folder: Path, size: int) -> float:
    """Seconds to write ``size`` bytes to a new file in ``folder`` and fsync it (1 MiB blocks)."""
    block = os.urandom(1 << 20)
    path = folder / "plain_write.bin"
    start = time.perf_counter()
    with open(path, "wb") as handle:
        for offset in range(0, size, len(block)):
            handle.write(block[:min(len(block), size - offset)])
        handle.flush()
        os.fsync(handle.fileno())
    elapsed = time.perf_counter() - start
    path.unlink()
    return elapsed


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


VARIANTS = {
    "tiny": [],  # configs/tiny_cpu.yaml as shipped: about 2 MB, fixed costs dominate
    "wide_lora": ["student.hidden_size=512", "student.intermediate_size=1376", "student.num_layers=4",
                  "student.num_heads=8", "student.lora=true", "student.lora_r=16"],  # about 70 MB, frozen base
}


def measure(shards: Path, tokenizer: Path, output_dir: Path, steps: int, overrides: list[str]) -> dict:
    """Train ``steps`` steps with a timed checkpoint after each; the medians over all saves but the first."""
    overrides = [f"data.shards={shards}", f"data.tokenizer={tokenizer}", f"run.output_dir={output_dir}",
                 f"train.max_steps={steps}", "checkpoint.every_steps=1", "checkpoint.keep_last=1",
                 "train.eval_every=0", "data.num_workers=0", *overrides]
    saves: list[dict] = []
    original = ckpt.save_checkpoint

    def timed_save(engine, checkpoint_dir, state, **kwargs):
        start = time.perf_counter()
        tag = original(engine, checkpoint_dir, state, **kwargs)
        seconds = time.perf_counter() - start
        size = folder_bytes(Path(checkpoint_dir) / tag)
        saves.append({"step": state.step, "seconds": seconds, "bytes": size,
                      "plain_write_seconds": plain_write_seconds(Path(checkpoint_dir), size)})
        return tag

    ckpt.save_checkpoint = timed_save
    try:
        code = train(["--config", str(ROOT / "configs" / "tiny_cpu.yaml"), *overrides])
    finally:
        ckpt.save_checkpoint = original
    assert code == 0, f"training exited {code}"
    student = count_models(load_config(ROOT / "configs" / "tiny_cpu.yaml", overrides), world_size=1).student
    timed = saves[1:]  # the first save also pays one-time costs (folders, imports)
    save_s = statistics.median(entry["seconds"] for entry in timed)
    plain_s = statistics.median(entry["plain_write_seconds"] for entry in timed)
    size = statistics.median(entry["bytes"] for entry in timed)
    formula = CHECKPOINT_BYTES_PER_TRAINABLE * student.trainable + FP32_BYTES * (student.total - student.trainable)
    return {"saves": saves, "median_save_s": save_s, "median_plain_write_s": plain_s, "median_bytes": size,
            "save_over_plain_write": save_s / plain_s, "save_mb_per_s": size / save_s / 1e6,
            "plain_write_mb_per_s": size / plain_s / 1e6, "plan_formula_bytes": formula,
            "measured_over_formula": size / formula,
            "student": {"total": student.total, "trainable": student.trainable}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="training steps per variant, one checkpoint after each")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one variant, in a child process
    parser.add_argument("--world", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variant:  # DeepSpeed keeps process-global state: one training per process
        result = measure(args.world / "shards", args.world / "tokenizer", args.world / args.variant, args.steps,
                         VARIANTS[args.variant])
        (args.world / f"{args.variant}.json").write_text(json.dumps(result))
        return 0
    results = {}
    with tempfile.TemporaryDirectory(dir=ROOT) as scratch:  # the repository's disk, where runs/ lives
        world = Path(scratch)
        make_world(world)
        for name, overrides in VARIANTS.items():
            subprocess.run([sys.executable, __file__, "--variant", name, "--world", str(world), "--steps",
                            str(args.steps)], check=True)
            results[name] = {"overrides": overrides, **json.loads((world / f"{name}.json").read_text())}
    for name, result in results.items():
        print(f"{name}: checkpoint of {result['median_bytes'] / 1e6:.2f} MB: save {result['median_save_s']:.3f} s "
              f"({result['save_mb_per_s']:.1f} MB/s), plain write + fsync {result['median_plain_write_s']:.3f} s "
              f"({result['plain_write_mb_per_s']:.1f} MB/s): save / plain write = "
              f"{result['save_over_plain_write']:.2f}; bytes / plan's formula = {result['measured_over_formula']:.3f}")
    out = ROOT / "bench" / "results" / "checkpoint_save_cpu.json"
    out.write_text(json.dumps({"config": "configs/tiny_cpu.yaml", "variants": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
