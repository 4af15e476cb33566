"""Rank-0 metrics: ``metrics.jsonl`` (one JSON object per logged step), TensorBoard events, and the progress bar.

Every logged line has ``step``, ``loss`` and each loss term by name (``ce``, ``kd``, ``align``; stage 2 adds its
own), plus ``lr``, ``tokens_per_s``, ``data_wait_frac`` and, on validation steps, ``val_loss`` and ``val_*`` terms.
On resume the lines after the resumed step are dropped first, so the file always describes one consistent run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm


def _all_reduce(values: dict[str, float], world_size: int, op) -> dict[str, float]:
    """One all-reduce with ``op`` for all of ``values`` (keys in sorted order on every rank); fp64 so that token
    counts and sums stay exact."""
    if world_size == 1 or not values:
        return {key: float(value) for key, value in values.items()}
    keys = sorted(values)
    packed = torch.tensor([float(values[key]) for key in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        packed = packed.cuda()
    dist.all_reduce(packed, op=op)
    return {key: float(value) for key, value in zip(keys, packed.tolist())}


def reduce_sum(values: dict[str, float], world_size: int) -> dict[str, float]:
    """Sum scalar metrics over ranks."""
    return _all_reduce(values, world_size, dist.ReduceOp.SUM)


def reduce_mean(values: dict[str, float], world_size: int) -> dict[str, float]:
    """Average scalar metrics over ranks (each rank weighs the same)."""
    return {key: value / world_size for key, value in reduce_sum(values, world_size).items()}


def reduce_max(values: dict[str, float], world_size: int) -> dict[str, float]:
    """Maximum of scalar metrics over ranks (a mean of per-rank maxima would hide one rank's outlier)."""
    return _all_reduce(values, world_size, dist.ReduceOp.MAX)


class MetricsLogger:
    def __init__(self, output_dir: Path, *, enabled: bool, total_steps: int, start_step: int):
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self.writer = None
        self.bar = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(output_dir / "tensorboard"))
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        self._last = time.perf_counter()

    def _truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, record: dict[str, float]) -> None:
        if not self.enabled:
            return
        line = {"step": step, **{key: round(value, 8) if isinstance(value, float) else value
                                 for key, value in record.items()}}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(line) + "\n")
        for key, value in record.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)

    def progress(self, step: int, shown: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.bar.set_postfix({key: f"{value:.4g}" for key, value in shown.items()}, refresh=False)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.close()
