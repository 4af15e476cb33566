"""What both recipes share: moving batches, agreeing on the resume point, and the checkpoint call.

Resuming, in order (both recipes)::

    resume = prepare_resume(config, runtime)      # before the engines: pick the checkpoint, convert if needed
    config = resume.config                        # checkpoint.universal resolved: the DeepSpeed config follows it
    engines = build_engines(config, runtime)
    if resume.folder is not None:
        state, rank_state = load_resume(engines, resume, runtime)

A checkpoint saved by another number of ranks (``trainer_state.json``'s world size) is loaded through DeepSpeed's
universal format when ``checkpoint.universal`` is ``auto`` (the default) or ``always``; ``never`` refuses it. The
loaders then re-partition the rest of the epoch by their documented rule (``data/state.py``), and the RNG streams
restart from ``run.seed + rank`` (per-rank streams of another world size cannot be carried over).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from kd_pipeline import checkpoint as ckpt
from kd_pipeline.config import Config
from kd_pipeline.prompts import IGNORE_INDEX
from kd_pipeline.runtime import Runtime, capture_rng_state

log = logging.getLogger(__name__)

# How often the ranks waiting for rank 0's universal conversion check in with it (one tiny all-reduce each time),
# so that a conversion longer than the process-group timeout never trips it.
CONVERSION_POLL_SECONDS = 5.0


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
    choice = None
    if runtime.is_main:
        folder = ckpt.resolve_resume(config.checkpoint.resume, Path(config.run.output_dir))
        choice = str(folder) if folder else None
    choice = ckpt.broadcast_from_rank0(choice, runtime.world_size)
    return Path(choice) if choice else None


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """Where this run continues from (``prepare_resume``)."""
    folder: Path | None          # the chosen checkpoint: trainer state, rank files and loader states are read here
    engine_folder: Path | None   # what DeepSpeed loads: ``folder``, or its ``<tag>_universal`` sibling
    config: Config               # the run config with checkpoint.universal resolved to "always" or "never"


def prepare_resume(config: Config, runtime: Runtime) -> ResumePoint:
    """Choose the checkpoint (rank 0 verifies it, all ranks use its choice) and decide how DeepSpeed loads it.

    Collective; call it before ``build_engines`` so that the returned config's ``checkpoint.universal`` reaches the
    student's DeepSpeed config (``load_universal``). When a conversion is needed, rank 0 runs it while the others
    wait (``_convert_on_rank0``).
    """
    folder = agree_on_resume(config, runtime)
    choice = config.checkpoint.universal
    universal = False
    if folder is not None:
        saved_world_size = ckpt.load_trainer_state(folder).world_size
        changed = saved_world_size != runtime.world_size
        if changed and choice == "never":
            raise ckpt.CheckpointError(
                f"{folder} was saved by {saved_world_size} ranks and this run has {runtime.world_size}; "
                f"checkpoint.universal=never forbids converting it: run with {saved_world_size} ranks, or set "
                f"checkpoint.universal=auto")
        universal = choice == "always" or (choice == "auto" and changed)
        if changed:
            log.warning("world size changed from %d to %d since %s: resuming through a universal checkpoint",
                        saved_world_size, runtime.world_size, folder.name)
    resolved = dataclasses.replace(config, checkpoint=dataclasses.replace(
        config.checkpoint, universal="always" if universal else "never"))
    engine_folder = _convert_on_rank0(folder, runtime) if universal else folder
    return ResumePoint(folder=folder, engine_folder=engine_folder, config=resolved)


def _convert_on_rank0(folder: Path, runtime: Runtime) -> Path:
    """Rank 0 converts ``folder`` to the universal format in a thread; every rank (rank 0 included) meets in a
    tiny all-reduce every ``CONVERSION_POLL_SECONDS`` until it is done, then rank 0 broadcasts the outcome."""
    if runtime.world_size == 1:
        return ckpt.convert_to_universal(folder)
    outcome: dict = {}

    def convert() -> None:
        try:
            outcome["path"] = str(ckpt.convert_to_universal(folder))
        except Exception as error:  # noqa: BLE001 - re-raised on every rank below, with its message
            outcome["error"] = f"{type(error).__name__}: {error}"

    worker = threading.Thread(target=convert, name="ds_to_universal", daemon=True) if runtime.is_main else None
    if worker is not None:
        worker.start()
    while True:
        done = torch.tensor([1 if worker is not None and not worker.is_alive() else 0], dtype=torch.int64)
        if dist.get_backend() == "nccl":
            done = done.cuda()
        dist.all_reduce(done, op=dist.ReduceOp.MAX)
        if done.item():
            break
        time.sleep(CONVERSION_POLL_SECONDS)
    box = [outcome]
    dist.broadcast_object_list(box, src=0)
    if "error" in box[0]:
        raise ckpt.CheckpointError(f"rank 0 could not convert {folder} to a universal checkpoint: {box[0]['error']}")
    return Path(box[0]["path"])


def load_resume(engines, resume: ResumePoint, runtime: Runtime) -> tuple[ckpt.TrainerState, dict | None]:
    """Load the student engine (module, ZeRO optimizer state, LR scheduler) and return the trainer state and this
    rank's saved state (RNG, recipe extras), the latter ``None`` when the world size changed."""
    load_path, _ = engines.student.load_checkpoint(
        str(resume.engine_folder.parent), tag=resume.engine_folder.name, load_optimizer_states=True,
        load_lr_scheduler_states=True)
    if load_path is None:
        raise ckpt.CheckpointError(f"DeepSpeed found no checkpoint files in {resume.engine_folder}")
    state = ckpt.load_trainer_state(resume.folder)
    rank_state = None
    if state.world_size == runtime.world_size:
        rank_state = ckpt.load_rank_state(resume.folder, runtime.rank)
    else:
        log.warning("checkpoint %s has %d ranks' RNG states and this run %d ranks: RNG streams restart from "
                    "run.seed + rank", resume.folder.name, state.world_size, runtime.world_size)
    state.world_size = runtime.world_size  # what the next checkpoint records
    return state, rank_state


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


def start_outputs(config: Config, runtime: Runtime, start_step: int):
    """Write the resolved config beside the outputs and open metrics and the stop controller.
    Returns (config_yaml, MetricsLogger, StopController)."""
    import yaml

    from kd_pipeline.config import config_to_dict
    from kd_pipeline.engine.metrics import MetricsLogger
    from kd_pipeline.engine.stopping import StopController

    output_dir = Path(config.run.output_dir)
    config_yaml = yaml.safe_dump(config_to_dict(config), sort_keys=False)
    if runtime.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(config_yaml)
    metrics = MetricsLogger(output_dir, enabled=runtime.is_main, total_steps=config.train.max_steps,
                            start_step=start_step)
    return config_yaml, metrics, StopController(config.run.stop_before_end_minutes)


def save(engines, config: Config, runtime: Runtime, state: ckpt.TrainerState, config_yaml: str, *,
         loaders: dict, extra: dict | None = None) -> str:
    """Checkpoint now: RNG states and ``extra`` (tensors/plain types) per rank, every loader's state per rank."""
    rank_payload = {"rng": capture_rng_state(), **(extra or {})}
    return ckpt.save_checkpoint(
        engines.student, Path(config.run.output_dir) / "checkpoints", state, rank=runtime.rank,
        world_size=runtime.world_size, rank_state=rank_payload, config_yaml=config_yaml,
        keep_last=config.checkpoint.keep_last,
        loader_states={name: loader.state_dict() for name, loader in loaders.items()})
