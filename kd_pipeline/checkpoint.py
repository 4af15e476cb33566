"""Checkpoints that are complete or invisible, with everything exact resume needs.

Layout under ``{run.output_dir}/checkpoints/``::

    step_00000050/                     one checkpoint (a DeepSpeed tag)
        mp_rank_00_model_states.pt     \\  DeepSpeed's own files (module, ZeRO shards of parameters and
        zero_pp_rank_*_..._states.pt   /   optimizer, LR scheduler), written by ``engine.save_checkpoint``
        rank_00000.pt ...              per rank: RNG states (python, numpy, torch) and the loader state
        trainer_state.json             step, best validation loss, world size, ZeRO stage, stage name
        config.yaml                    the resolved run config
        COMPLETE.json                  written LAST: sha256 and size of every file above
    step_00000050_universal/           only after a world-size change: the same state in DeepSpeed's universal
                                       format (``zero/<param>/{fp32,exp_avg,exp_avg_sq}.pt``), own COMPLETE.json
    latest                             text file naming the newest complete tag (written after COMPLETE.json)
    best                               text file naming the tag with the lowest validation loss

Ordering of a save (all ranks): rank 0 deletes a leftover folder of the same tag -> broadcast -> DeepSpeed save
without touching its ``latest`` -> each rank writes its rank file and hashes the files that carry its rank id ->
all-gather of the hashes -> rank 0 hashes the shared files, writes ``COMPLETE.json`` and then ``latest`` (both via
temp file + rename) -> prunes -> broadcast of the outcome. A crash anywhere before the rename leaves
``latest`` on the previous checkpoint; ``find_resume_tag`` also refuses any folder without a valid marker, so a
partial folder is never picked up. Pruning keeps ``checkpoint.keep_last`` complete periodic checkpoints and never
deletes ``best`` or the only complete one.

Failures while saving: an ``OSError`` or a failed ``torch.save`` (torch reports a full disk or an unwritable
folder as a ``RuntimeError``) on any rank is shared with every rank (all-gather, then a broadcast of rank 0's
finishing step), so all ranks raise the same ``CheckpointError`` together instead of leaving some in a collective;
``latest`` still names the previous checkpoint. A leftover folder of the tag being saved (an interrupted or rejected
earlier save) is deleted first, so no stale shard can be hashed into a new marker.

World-size changes: ``convert_to_universal`` runs DeepSpeed's ``ds_to_universal`` into the sibling folder
``<tag>_universal``, marked complete the same way (its marker lists every file under it); an unmarked sibling is a
partial conversion and is redone. Pruning a checkpoint prunes its universal sibling too.

Test hook: ``KD_TEST_KILL_IN_SAVE=<rank>:<step>`` makes that rank send itself SIGKILL right after DeepSpeed's save
of that step, before its rank file and before any marker (a node lost in the middle of a save).

Pickles are loaded with ``weights_only=True`` (rank files hold tensors and plain types only); the DeepSpeed shards
are read by DeepSpeed's own loaders.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from kd_pipeline.errors import UserError
from kd_pipeline.fileio import write_atomic

log = logging.getLogger(__name__)

MARKER = "COMPLETE.json"
TAG_PATTERN = re.compile(r"^step_(\d{8})$")
UNIVERSAL_SUFFIX = "_universal"
KILL_IN_SAVE_ENV = "KD_TEST_KILL_IN_SAVE"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be written or used, worded with the path and what to do."""


@dataclass
class TrainerState:
    """A run's global progress, saved as ``trainer_state.json`` with every checkpoint (runtime state, not
    configuration). What happens when a resumed run's config disagrees with it: ``kd_pipeline.progress``."""
    step: int = 0                       # optimizer steps completed
    best_val_loss: float | None = None  # lowest validation loss so far ...
    best_tag: str | None = None         # ... and the checkpoint that holds it (``best``)
    world_size: int = 1                 # ranks that wrote the checkpoint
    zero_stage: int = 3                 # the student's ZeRO stage when it was written
    stage: str = "kd_sft"               # run.stage that wrote it
    rollout_round: int = 0              # stage 2: index of the rollout round in progress (seeds its PPO order)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> TrainerState:
        fields = json.loads(text)
        # Checkpoints written before the field was typed kept the round under an untyped "extra" dict.
        legacy = fields.pop("extra", None) or {}
        if "round" in legacy:
            fields.setdefault("rollout_round", int(legacy["round"]))
        return cls(**fields)


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


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
    """``names`` are paths relative to ``folder`` (a universal checkpoint has sub-folders)."""
    return {name: {"sha256": _sha256(folder / name), "bytes": (folder / name).stat().st_size} for name in names}


def _all_gather(value, world_size: int) -> list:
    if world_size == 1:
        return [value]
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_from_rank0(value, world_size: int):
    """Rank 0's ``value`` on every rank (any picklable object)."""
    if world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _write_failure(error: Exception, folder: Path) -> str:
    """What went wrong writing ``folder``, in words an operator can act on; re-raises collective failures (a lost
    peer is not a disk problem and must surface as what it is)."""
    if isinstance(error, dist.DistError):
        raise error
    if isinstance(error, OSError):
        detail = f"{error.strerror or error}" + (f" ({error.filename})" if error.filename else "")
    else:  # torch.save reports I/O failures as RuntimeError with the C++ stream's message
        detail = f"torch.save failed: {str(error).splitlines()[0][:200]}"
    try:
        free = shutil.disk_usage(folder.parent).free / 2**30
        detail += f"; {free:.2f} GiB free on that filesystem"
    except OSError:
        pass
    return detail


def _maybe_kill_for_test(rank: int, step: int) -> None:
    """The ``KD_TEST_KILL_IN_SAVE`` test hook (see the module docstring)."""
    target = os.environ.get(KILL_IN_SAVE_ENV, "")
    if target == f"{rank}:{step}":
        log.warning("%s=%s: killing rank %d in the middle of the save of step %d", KILL_IN_SAVE_ENV, target, rank,
                    step)
        os.kill(os.getpid(), signal.SIGKILL)


def _remove_checkpoint_folder(folder: Path) -> None:
    """Delete a checkpoint folder marker first (so a crash half-way leaves an invisible folder) and its universal
    sibling."""
    for path in (folder, universal_folder(folder)):
        if path.is_dir():
            (path / MARKER).unlink(missing_ok=True)
            shutil.rmtree(path)


def save_checkpoint(engine, checkpoint_dir: str | Path, state: TrainerState, *, rank: int, world_size: int,
                    rank_state: dict, config_yaml: str, keep_last: int, loader_states: dict | None = None) -> str:
    """Save a complete checkpoint at ``state.step`` on every rank; returns its tag. Collective.

    ``rank_state`` (tensors and plain types) goes to ``rank_{r}.pt``; ``loader_states`` maps a loader name to this
    rank's ``state_dict()``, written with ``kd_pipeline.data.save_loader_state``. Raises ``CheckpointError`` on every
    rank when any rank failed to write (see the module docstring); the previous checkpoint stays the resume point.
    """
    from kd_pipeline.data import save_loader_state

    checkpoint_dir = Path(checkpoint_dir)
    tag = tag_for_step(state.step)
    folder = checkpoint_dir / tag
    problem = None
    if rank == 0 and folder.exists():
        log.warning("removing %s left over from an earlier, interrupted or rejected save of the same step", folder)
        try:
            _remove_checkpoint_folder(folder)
        except OSError as error:
            problem = _write_failure(error, folder)
    # Every rank must know before DeepSpeed's save (which holds collectives of its own) whether it goes ahead.
    problem = broadcast_from_rank0(problem, world_size)
    if problem:
        _raise_save_failure(folder, {0: problem})
    my_hashes: dict[str, dict] = {}
    try:
        engine.save_checkpoint(str(checkpoint_dir), tag=tag, save_latest=False)
        _maybe_kill_for_test(rank, state.step)
        torch.save(rank_state, folder / f"rank_{rank:05d}.pt")
        for name, loader_state in (loader_states or {}).items():
            save_loader_state(folder, name, rank, loader_state)
        mine = sorted(p.name for p in folder.iterdir() if p.is_file() and _owned_by_rank(p.name, rank))
        my_hashes = _hash_files(folder, mine)
    except (OSError, RuntimeError) as error:
        problem = _write_failure(error, folder)
    gathered = _all_gather((my_hashes, problem), world_size)
    failures = {index: message for index, (_, message) in enumerate(gathered) if message}
    if failures:
        _raise_save_failure(folder, failures)
    finish_problem = None
    if rank == 0:
        try:
            (folder / "trainer_state.json").write_text(state.to_json())
            (folder / "config.yaml").write_text(config_yaml)
            files = {name: entry for hashes, _ in gathered for name, entry in hashes.items()}
            shared = sorted(p.name for p in folder.iterdir()
                            if p.is_file() and p.name not in files and p.name != MARKER and not p.name.startswith("."))
            files.update(_hash_files(folder, shared))
            _write_marker(folder, tag, state.step, files)
            write_atomic(checkpoint_dir / "latest", tag)
            if state.best_tag:
                write_atomic(checkpoint_dir / "best", state.best_tag)
            prune(checkpoint_dir, keep_last=keep_last, protect={state.best_tag} if state.best_tag else set())
        except OSError as error:
            finish_problem = _write_failure(error, folder)
    # Replaces a final barrier: every rank leaves only after rank 0 finished, and learns whether it succeeded.
    finish_problem = broadcast_from_rank0(finish_problem, world_size)
    if finish_problem:
        _raise_save_failure(folder, {0: finish_problem})
    return tag


def _raise_save_failure(folder: Path, failures: dict[int, str]) -> None:
    where = "; ".join(f"rank {index}: {message}" for index, message in sorted(failures.items()))
    latest = folder.parent / "latest"
    previous = latest.read_text().strip() if latest.is_file() else None
    raise CheckpointError(
        f"could not write checkpoint {folder} ({where}). The previous checkpoint "
        f"{'(' + previous + ') ' if previous else ''}is intact and stays the resume point; free disk space or fix "
        f"the folder's permissions, then run the same command again to resume")


def _write_marker(folder: Path, tag: str, step: int, files: dict[str, dict]) -> None:
    write_atomic(folder / MARKER, json.dumps({"tag": tag, "step": step, "files": files}, indent=1))


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
    """Delete old complete checkpoints beyond ``keep_last``, leftovers of interrupted saves, and the universal
    siblings of whatever is deleted."""
    complete = complete_tags(checkpoint_dir)
    keep = set(complete[:max(keep_last, 1)]) | protect
    newest = complete[0] if complete else None
    for path in sorted(checkpoint_dir.iterdir()):
        if not path.is_dir() or not TAG_PATTERN.match(path.name) or path.name in keep:
            continue
        if path.name in complete or (newest is not None and path.name < newest):
            log.info("pruning checkpoint %s", path)
            shutil.rmtree(universal_folder(path), ignore_errors=True)
            shutil.rmtree(path, ignore_errors=True)
    for path in sorted(checkpoint_dir.glob(f"step_*{UNIVERSAL_SUFFIX}")):
        if path.is_dir() and not (checkpoint_dir / path.name.removesuffix(UNIVERSAL_SUFFIX)).is_dir():
            log.info("pruning universal checkpoint %s (its checkpoint is gone)", path)
            shutil.rmtree(path, ignore_errors=True)


def load_rank_state(folder: Path, rank: int) -> dict:
    path = folder / f"rank_{rank:05d}.pt"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: this checkpoint was written by fewer ranks than the "
                              f"{rank + 1} now running; resume with the original world size or a universal checkpoint")
    return torch.load(path, weights_only=True)


def load_trainer_state(folder: Path) -> TrainerState:
    return TrainerState.from_json((folder / "trainer_state.json").read_text())


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


def module_state(folder: Path, lazy: bool = False) -> dict[str, torch.Tensor]:
    """Every weight of the saved module, fp32 where DeepSpeed keeps fp32 masters, whatever the ZeRO stage.

    ZeRO-3 and ZeRO-1/2: DeepSpeed's own consolidation (``get_fp32_state_dict_from_zero_checkpoint``; with ``lazy``
    values materialise on ``.contiguous()``). Under ZeRO-1/2 that covers only the optimizer's parameters, so frozen
    ones (the CLIP tower) come from the full module those stages store in ``*_model_states.pt`` (a frozen weight is
    never updated, so that copy is exact; ZeRO-3's file holds empty placeholders, which are skipped). Without ZeRO
    (stage 0) the stored module is the whole state. DeepSpeed reads its own pickles with ``weights_only=False``;
    callers verify the folder against ``COMPLETE.json`` first. Its progress lines on stdout go to the debug log."""
    import contextlib
    import io

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    states = sorted(folder.glob("*mp_rank_00_model_states.pt"))
    if not states:
        raise CheckpointError(f"{folder} has no DeepSpeed *_model_states.pt file: not a DeepSpeed checkpoint")
    stored = torch.load(states[0], map_location="cpu", weights_only=True, mmap=True)
    module = stored.get("module") or {}
    if int((stored.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0)) == 0:
        return dict(module)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name, lazy_mode=lazy)
    except (ValueError, FileNotFoundError, KeyError) as error:
        raise CheckpointError(f"DeepSpeed cannot consolidate {folder}: {error}") from error
    for line in captured.getvalue().splitlines():
        log.debug("zero_to_fp32: %s", line)
    frozen = {key: value for key, value in module.items() if key not in state and value.numel() > 0}
    return {**frozen, **state}


def load_module_weights(module: torch.nn.Module, folder: Path) -> None:
    """Load only the module weights of a checkpoint (written at any world size) into ``module`` BEFORE it is wrapped
    by ``deepspeed.initialize``: ZeRO-3 keeps fp32 master partitions in its optimizer and would overwrite weights
    copied in afterwards at the first step. Consolidation is DeepSpeed's own; partitioned (ZeRO-3) parameters are
    written by rank 0 inside ``GatheredParameters`` and re-partitioned on exit, plain ones on every rank.
    Used by stage 2's ``run.init_from``."""
    import deepspeed

    state = module_state(folder)
    named = dict(module.named_parameters())
    missing = sorted(set(named) - set(state))
    if missing:
        raise CheckpointError(f"{folder} lacks weights for {missing[:5]}{' ...' if len(missing) > 5 else ''}: "
                              f"it was trained with another architecture or LoRA setting")
    partitioned = [param for param in named.values() if hasattr(param, "ds_id")]
    is_rank0 = not dist.is_initialized() or dist.get_rank() == 0
    with torch.no_grad(), deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0, enabled=bool(partitioned)):
        for name, param in named.items():
            if is_rank0 or not hasattr(param, "ds_id"):
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


# ----------------------------------------------------------------------------------------------- world-size change


def universal_folder(folder: Path) -> Path:
    """Where the universal form of checkpoint ``folder`` lives: its sibling ``<tag>_universal``."""
    return folder.with_name(folder.name + UNIVERSAL_SUFFIX)


def convert_to_universal(folder: Path) -> Path:
    """DeepSpeed's ``ds_to_universal`` of ``folder`` into ``<tag>_universal`` (reused when already complete).

    Not collective: rank 0 calls it while the other ranks wait (see ``recipes.common.prepare_resume``). It runs as a
    subprocess so that its worker pools and memory are gone when training starts; its output goes to
    ``<tag>_universal.log`` next to the folder. The marker is written last, as for every checkpoint.
    """
    target = universal_folder(folder)
    if target.is_dir() and verify_checkpoint(target) is None:
        log.info("reusing the universal checkpoint %s", target)
        return target
    if target.exists():
        log.warning("removing the incomplete universal checkpoint %s (an interrupted conversion)", target)
        shutil.rmtree(target)
    log_path = target.with_name(target.name + ".log")
    workers = str(max(1, min(4, os.cpu_count() or 1)))
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(folder),
               "--output_folder", str(target), "--num_extract_workers", workers, "--num_merge_workers", workers]
    log.info("converting %s to a universal checkpoint: %s", folder, " ".join(command))
    with open(log_path, "w") as log_file:
        result = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
        raise CheckpointError(f"ds_to_universal failed on {folder} (exit {result.returncode}); last lines of "
                              f"{log_path}: {' | '.join(tail)}. Resume with the original world size instead "
                              f"(checkpoint.universal=never), or fix the cause and run again")
    # ds_to_universal also points its own `latest_universal` at the folder; nothing here reads it (tags are explicit).
    (target.parent / "latest_universal").unlink(missing_ok=True)
    names = sorted(str(path.relative_to(target)) for path in target.rglob("*") if path.is_file())
    step = load_trainer_state(folder).step
    _write_marker(target, target.name, step, _hash_files(target, names))
    return target
