"""Sharding throughput compared with plain ``tar`` of the same image files on the same disk.

Runbook::

    .venv/bin/python bench/bench_sharding.py --quick          # ~200 small JPEGs, one repeat, a few seconds
    .venv/bin/python bench/bench_sharding.py --workers 2      # 1000 JPEGs of 512x512, three repeats

What is timed (median over repeats, page cache warmed first so that neither side pays for cold reads):
``python -m data_prep shard`` as a user runs it (interpreter and worker start-up, screening, image validation, tar
writing, hashing, fsync, manifest) against ``tar -cf`` of the image directory into the same work directory, both as
child processes, alternating. Two clocks: wall time, and CPU time (user + system of the finished children, the
shard workers included), which a shared machine disturbs less. ``shard_throughput_vs_tar`` is tar's time over shard's (the issue's measure:
1.0 means as fast as tar); ``shard_over_tar_*_ratio`` its inverse. Shard uses ``--workers`` cores and tar one, so
the CPU ratio is the cost per byte and the wall ratio what a user waits. Results go to
``bench/results/sharding_cpu.json`` (``sharding_cpu_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]

logger = logging.getLogger("bench_sharding")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 images of 128x128, one repeat")
    parser.add_argument("--samples", type=int, default=1000, help="number of images (ignored with --quick)")
    parser.add_argument("--image-size", type=int, default=512, help="image side in pixels (ignored with --quick)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per side (ignored with --quick)")
    parser.add_argument("--workers", type=int, default=2, help="shard writer processes")
    parser.add_argument("--work-dir", default=None, help="scratch directory (default: system temp)")
    parser.add_argument("--out", default=None,
                        help="JSON path (default bench/results/sharding_cpu.json, with --quick sharding_cpu_quick.json)")
    return parser


def make_dataset(work_dir: Path, samples: int, image_size: int) -> tuple[Path, Path, int]:
    """Noisy JPEGs (noise keeps them near real photo sizes) and one instruct record per image."""
    images = work_dir / "images"
    images.mkdir(parents=True)
    generator = np.random.default_rng(0)
    records, total_bytes = [], 0
    for index in range(samples):
        pixels = generator.integers(0, 255, size=(image_size, image_size, 3), dtype=np.uint8)
        path = images / f"{index:06d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        total_bytes += path.stat().st_size
        records.append({"id": f"img{index}", "image": path.name, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image in detail."},
            {"from": "gpt", "value": "Noise, as far as the eye can see."}]})
    instruct = work_dir / "instruct.json"
    instruct.write_text(json.dumps(records))
    return instruct, images, total_bytes


def warm_page_cache(images: Path) -> None:
    for path in images.iterdir():
        path.read_bytes()


def children_cpu_seconds() -> float:
    """User + system CPU time of the finished child processes (and the children they waited for)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_command(command: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one run of ``command``; its output is discarded."""
    started, cpu_started = time.perf_counter(), children_cpu_seconds()
    subprocess.run(command, check=True, cwd=REPOSITORY_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started, children_cpu_seconds() - cpu_started


def time_shard(instruct: Path, images: Path, out: Path, workers: int, shard_megabytes: float) -> tuple[float, float]:
    shutil.rmtree(out, ignore_errors=True)
    return time_command([sys.executable, "-m", "data_prep", "shard", "--instruct", str(instruct), "--images",
                         str(images), "--out", str(out), "--workers", str(workers), "--max-shard-mb",
                         str(shard_megabytes), "--val-fraction", "0"])


def time_tar(images: Path, archive: Path) -> tuple[float, float]:
    archive.unlink(missing_ok=True)
    return time_command(["tar", "-cf", str(archive), "-C", str(images), "."])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    samples, image_size, repeats = (200, 128, 1) if args.quick else (args.samples, args.image_size, args.repeats)
    work_dir = Path(tempfile.mkdtemp(prefix="bench_sharding_", dir=args.work_dir))
    try:
        logger.info("writing %d images of %dx%d to %s", samples, image_size, image_size, work_dir)
        instruct, images, image_bytes = make_dataset(work_dir, samples, image_size)
        warm_page_cache(images)
        # about 4 shards per worker, so that every worker has work and the last shard does not dominate
        shard_megabytes = max(image_bytes / (4 * args.workers) / 2**20, 0.1)
        shard_times, tar_times = [], []
        for _ in range(repeats):
            shard_times.append(time_shard(instruct, images, work_dir / "shards", args.workers, shard_megabytes))
            tar_times.append(time_tar(images, work_dir / "plain.tar"))
        shard_seconds, tar_seconds = (statistics.median(wall for wall, _ in times) for times in (shard_times, tar_times))
        shard_cpu, tar_cpu = (statistics.median(cpu for _, cpu in times) for times in (shard_times, tar_times))
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)

    result = {
        "benchmark": "sharding_vs_tar", "quick": args.quick, "samples": samples, "image_size": image_size,
        "image_megabytes": round(image_bytes / 1e6, 3), "workers": args.workers, "repeats": repeats,
        "shard_seconds": round(shard_seconds, 4), "tar_seconds": round(tar_seconds, 4),
        "shard_over_tar_time_ratio": round(shard_seconds / tar_seconds, 2),
        "shard_throughput_vs_tar": round(tar_seconds / shard_seconds, 3),
        "shard_cpu_seconds": round(shard_cpu, 4), "tar_cpu_seconds": round(tar_cpu, 4),
        "shard_over_tar_cpu_ratio": round(shard_cpu / tar_cpu, 2),
        "shard_cpu_throughput_vs_tar": round(tar_cpu / shard_cpu, 3),
        "shard_samples_per_second": round(samples / shard_seconds, 1),
        "shard_megabytes_per_second": round(image_bytes / 1e6 / shard_seconds, 2),
        "tar_megabytes_per_second": round(image_bytes / 1e6 / tar_seconds, 2),
        "load_average": os.getloadavg(), "cpu_count": os.cpu_count(), "python": platform.python_version(), "pillow": PIL.__version__,
        "machine": platform.machine(),
    }
    out = Path(args.out or REPOSITORY_ROOT / f"bench/results/sharding_cpu{'_quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for key, value in result.items():
        print(f"{key:<28} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
