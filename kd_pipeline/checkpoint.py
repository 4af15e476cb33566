"""Checkpoints that are complete or invisible, with everything exact resume needs.

Layout under ``{run.output_dir}/checkpoints/``::

    step_00000050/                     one checkpoint (a DeepSpeed tag)
        mp_rank_00_model_states.pt     \\  DeepSpeed's own files (module, ZeRO shards of parameters and
        zero_pp_rank_*_..._states.pt   /   optimizer, LR scheduler), written by ``engine.save_checkpoint``
        rank_00000.pt ...              per rank: RNG states (python, numpy, torch) and the loader state
        trainer_state.json             step, best validation loss, world size, ZeRO stage, stage name
        config.yaml                    the resolved run config
        COMPLETE.json                  written LAST: sha256 and size of every file above
    latest                             text file naming the newest complete tag (written after COMPLETE.json)
    best                               text file naming the tag with the lowest validation loss

Ordering of a save (all ranks): DeepSpeed save without touching its ``latest`` -> each rank writes its rank file and
hashes the files that carry its rank id -> barrier -> rank 0 hashes the shared files, writes ``COMPLETE.json`` and
then ``latest`` (both via temp file + rename) -> prunes -> barrier. A crash anywhere before the rename leaves
``latest`` on the previous checkpoint; ``find_resume_tag`` also refuses any folder without a valid marker, so a
partial folder is never picked up. Pruning keeps ``checkpoint.keep_last`` complete periodic checkpoints and never
deletes ``best`` or the only complete one.

Pickles are loaded with ``weights_only=True`` (rank files hold tensors and plain types only).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

MARKER = "COMPLETE.json"
TAG_PATTERN = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or used, worded with the path and what to do."""


@dataclass
class TrainerState:
    """Counters and bookkeeping saved with every checkpoint (runtime state, not configuration)."""
    step: int = 0
    best_val_loss: float | None = None
    best_tag: str | None = None
    world_size: int = 1
    zero_stage: int = 3
    stage: str = "kd_sft"
    extra: dict = field(default_factory=dict)


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _owned_by_rank(name: str, rank: int) -> bool:
    """DeepSpeed names per-rank shards ``zero_pp_rank_{r}_...`` / ``bf16_zero_pp_rank_{r}_...``; ours are
    ``rank_{r:05d}.pt`` and the loader's ``loader_{name}_rank{r:05d}.json``."""
    return (re.search(rf"(^|_)pp_rank_{rank}_", name) is not None or name == f"rank_{rank:05d}.pt"
            or re.fullmatch(rf"loader_\w+_rank{rank:05d}\.json", name) is not None)


def _hash_files(folder: Path, names: list[str]) -> dict[str, dict]:
    return {name: {"sha256": _sha256(folder / name), "bytes": (folder / name).stat().st_size} for name in names}


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_checkpoint(engine, checkpoint_dir: str | Path, state: TrainerState, *, rank: int, world_size: int,
                    rank_state: dict, config_yaml: str, keep_last: int, loader_states: dict | None = None) -> str:
    """Save a complete checkpoint at ``state.step`` on every rank; returns its tag.

    ``rank_state`` (tensors and plain types) goes to ``rank_{r}.pt``; ``loader_states`` maps a loader name to this
    rank's ``state_dict()``, written with ``kd_pipeline.data.save_loader_state``.
    """
    from kd_pipeline.data import save_loader_state

    checkpoint_dir = Path(checkpoint_dir)
    tag = tag_for_step(state.step)
    folder = checkpoint_dir / tag
    try:
        engine.save_checkpoint(str(checkpoint_dir), tag=tag, save_latest=False)
        torch.save(rank_state, folder / f"rank_{rank:05d}.pt")
        for name, loader_state in (loader_states or {}).items():
            save_loader_state(folder, name, rank, loader_state)
        mine = sorted(p.name for p in folder.iterdir() if p.is_file() and _owned_by_rank(p.name, rank))
        my_hashes = _hash_files(folder, mine)
    except OSError as error:
        raise CheckpointError(f"could not write checkpoint {folder}: {error.strerror or error}. The previous "
                              f"checkpoint is intact; free disk space or fix permissions, then resume") from error
    gathered: list = [None] * world_size
    if world_size > 1:
        dist.all_gather_object(gathered, my_hashes)
    else:
        gathered = [my_hashes]
    if rank == 0:
        try:
            (folder / "trainer_state.json").write_text(json.dumps(state.__dict__, indent=2))
            (folder / "config.yaml").write_text(config_yaml)
            files = {name: entry for hashes in gathered for name, entry in hashes.items()}
            shared = sorted(p.name for p in folder.iterdir()
                            if p.is_file() and p.name not in files and p.name != MARKER and not p.name.startswith("."))
            files.update(_hash_files(folder, shared))
            _atomic_write(folder / MARKER, json.dumps({"tag": tag, "step": state.step, "files": files}, indent=1))
            _atomic_write(checkpoint_dir / "latest", tag)
            if state.best_tag:
                _atomic_write(checkpoint_dir / "best", state.best_tag)
            prune(checkpoint_dir, keep_last=keep_last, protect={state.best_tag} if state.best_tag else set())
        except OSError as error:
            raise CheckpointError(f"could not finish checkpoint {folder}: {error.strerror or error}. The previous "
                                  f"checkpoint is intact; free disk space or fix permissions, then resume") from error
    _barrier()
    return tag


def verify_checkpoint(folder: Path, *, deep: bool = True) -> str | None:
    """``None`` when ``folder`` is a complete checkpoint, else what is wrong with it."""
    marker = folder / MARKER
    if not marker.is_file():
        return "no COMPLETE.json marker (the save did not finish)"
    try:
        manifest = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return "COMPLETE.json is unreadable"
    for name, entry in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, expected {entry['bytes']}"
        if deep and _sha256(path) != entry["sha256"]:
            return f"{name} does not match its sha256 (changed or corrupted bytes)"
    return None


def complete_tags(checkpoint_dir: Path) -> list[str]:
    """Tags with a marker, newest first (markers only; contents are checked by ``verify_checkpoint``)."""
    if not checkpoint_dir.is_dir():
        return []
    tags = [p.name for p in checkpoint_dir.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name)
            and (p / MARKER).is_file()]
    return sorted(tags, reverse=True)


def find_resume_tag(checkpoint_dir: str | Path) -> str | None:
    """The newest checkpoint that verifies, preferring ``latest``; each rejected one is reported loudly."""
    checkpoint_dir = Path(checkpoint_dir)
    candidates = complete_tags(checkpoint_dir)
    latest_file = checkpoint_dir / "latest"
    if latest_file.is_file():
        latest = latest_file.read_text().strip()
        if latest in candidates:
            candidates.remove(latest)
        candidates.insert(0, latest)
    for tag in candidates:
        problem = verify_checkpoint(checkpoint_dir / tag)
        if problem is None:
            return tag
        log.error("checkpoint %s is unusable: %s; falling back to the previous complete one", checkpoint_dir / tag,
                  problem)
    return None


def prune(checkpoint_dir: Path, *, keep_last: int, protect: set[str]) -> None:
    """Delete old complete checkpoints beyond ``keep_last`` and leftovers of interrupted saves."""
    complete = complete_tags(checkpoint_dir)
    keep = set(complete[:max(keep_last, 1)]) | protect
    newest = complete[0] if complete else None
    for path in checkpoint_dir.iterdir():
        if not path.is_dir() or not TAG_PATTERN.match(path.name) or path.name in keep:
            continue
        if path.name in complete or (newest is not None and path.name < newest):
            log.info("pruning checkpoint %s", path)
            shutil.rmtree(path, ignore_errors=True)


def load_rank_state(folder: Path, rank: int) -> dict:
    path = folder / f"rank_{rank:05d}.pt"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: this checkpoint was written by fewer ranks than the "
                              f"{rank + 1} now running; resume with the original world size or a universal checkpoint")
    return torch.load(path, weights_only=True)


def load_trainer_state(folder: Path) -> TrainerState:
    return TrainerState(**json.loads((folder / "trainer_state.json").read_text()))


def resolve_init_from(init_from: str) -> Path:
    """``run.init_from``: a run folder (its ``best`` checkpoint, else ``latest``) or a checkpoint folder."""
    path = Path(init_from)
    checkpoint_dir = path / "checkpoints"
    if checkpoint_dir.is_dir():
        for pointer in ("best", "latest"):
            if (checkpoint_dir / pointer).is_file():
                path = checkpoint_dir / (checkpoint_dir / pointer).read_text().strip()
                log.info("run.init_from=%s: using its %s checkpoint %s", init_from, pointer, path.name)
                break
    problem = verify_checkpoint(path, deep=False) if path.is_dir() else "it does not exist"
    if problem:
        raise CheckpointError(f"run.init_from={init_from}: {path} is not a usable checkpoint ({problem})")
    return path


def load_module_weights(engine, folder: Path) -> None:
    """Load only the module weights of a checkpoint (any world size) into a ZeRO-3 engine: DeepSpeed's own
    consolidation on every rank, then rank 0's copy into the gathered parameters. Used by stage 2's init_from."""
    import deepspeed
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    module = engine.module
    named = dict(module.named_parameters())
    missing = sorted(set(named) - set(state))
    if missing:
        raise CheckpointError(f"{folder} lacks weights for {missing[:5]}{' ...' if len(missing) > 5 else ''}: "
                              f"it was trained with another architecture or LoRA setting")
    zero3 = any(hasattr(p, "ds_id") for p in named.values())
    with deepspeed.zero.GatheredParameters(list(named.values()), modifier_rank=0, enabled=zero3):
        if not dist.is_initialized() or dist.get_rank() == 0:
            with torch.no_grad():
                for name, param in named.items():
                    param.copy_(state[name].to(param.dtype))


def resolve_resume(resume: str, output_dir: Path) -> Path | None:
    """``checkpoint.resume`` -> a checkpoint folder (or ``None`` to start fresh). Rank 0 decides; see train.py."""
    if resume == "none":
        return None
    if resume == "auto":
        checkpoint_dir = output_dir / "checkpoints"
        tag = find_resume_tag(checkpoint_dir)
        return checkpoint_dir / tag if tag else None
    folder = Path(resume)
    problem = verify_checkpoint(folder) if folder.is_dir() else "it does not exist"
    if problem:
        raise CheckpointError(f"checkpoint.resume={resume}: {problem}")
    return folder
