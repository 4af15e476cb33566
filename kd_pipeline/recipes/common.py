"""What both recipes share: moving batches, agreeing on the resume point, and the checkpoint call."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from kd_pipeline import checkpoint as ckpt
from kd_pipeline.config import Config
from kd_pipeline.prompts import IGNORE_INDEX
from kd_pipeline.runtime import Runtime, capture_rng_state


def to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Tensors to ``device``; floating ones (pixel values) to the compute dtype; the rest (keys, counts) as is."""
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if value.is_floating_point():
                value = value.to(dtype)
        moved[key] = value
    return moved


def supervised_count(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def agree_on_resume(config: Config, runtime: Runtime) -> Path | None:
    """Rank 0 picks the checkpoint (verifying checksums once) and every rank uses its choice."""
    choice = [None]
    if runtime.is_main:
        folder = ckpt.resolve_resume(config.checkpoint.resume, Path(config.run.output_dir))
        choice = [str(folder) if folder else None]
    if runtime.world_size > 1:
        dist.broadcast_object_list(choice, src=0)
    return Path(choice[0]) if choice[0] else None


def write_partition_report(engines, output_dir: Path, rank: int) -> None:
    """``engine_rank{r}.json``: this rank's share of each engine's parameters after training (the test of ZeRO-3
    partitioning and of a teacher with no gradients and no optimizer reads it; operators can too)."""
    import json

    from kd_pipeline.engine.build import partition_report

    report = {"student": partition_report(engines.student)}
    if engines.teacher is not None:
        report["teacher"] = {**partition_report(engines.teacher),
                             "forward_count": engines.teacher.module.forward_count}
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"engine_rank{rank}.json").write_text(json.dumps(report, indent=1))


def save(engines, config: Config, runtime: Runtime, state: ckpt.TrainerState, config_yaml: str, *,
         loaders: dict, extra: dict | None = None) -> str:
    """Checkpoint now: RNG states and ``extra`` (tensors/plain types) per rank, every loader's state per rank."""
    rank_payload = {"rng": capture_rng_state(), **(extra or {})}
    return ckpt.save_checkpoint(
        engines.student, Path(config.run.output_dir) / "checkpoints", state, rank=runtime.rank,
        world_size=runtime.world_size, rank_state=rank_payload, config_yaml=config_yaml,
        keep_last=config.checkpoint.keep_last,
        loader_states={name: loader.state_dict() for name, loader in loaders.items()})
