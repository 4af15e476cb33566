"""What both recipes share: the session they set up before their loop, the end-of-step policy, the step's clock.

A recipe reads top to bottom as setup, then the loop::

    session = open_session(config, runtime)        # resume point -> engines -> progress -> outputs
    loaders = ...(session.loader_state("train"))   # loaders before the RNG states: building them draws no numbers
    session.restore_rng()
    end_of_step = StepEnd(session, validate=..., save=...)
    for step in range(session.state.step + 1, config.train.max_steps + 1):
        with session.watchdog.step():              # a rank stuck in the step dumps its stacks (engine/stopping.py)
            record = <one optimizer step>
            session.state.step = step
            stopped = end_of_step(record)
        if stopped:
            break                                  # saved; exit RESUME_EXIT_CODE
    return session.close(stopped)

Resuming (``prepare_resume``, inside ``open_session``): rank 0 picks the checkpoint and every rank uses its choice;
``progress.check_resume`` refuses a checkpoint of another stage, ZeRO stage or student shape before any model loads.
A checkpoint saved by another number of ranks (``trainer_state.json``'s world size) is loaded through DeepSpeed's
universal format when ``checkpoint.universal`` is ``auto`` (the default) or ``always``; ``never`` refuses it. The
loaders then re-partition the rest of the epoch by their documented rule (``data/state.py``), and the RNG streams
restart from ``run.seed + rank`` (per-rank streams of another world size cannot be carried over).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from kd_pipeline import checkpoint as ckpt
from kd_pipeline.config import Config, config_to_dict
from kd_pipeline.data import load_loader_state
from kd_pipeline.engine.build import Engines, build_engines
from kd_pipeline.engine.collectives import MAX, all_reduce_floats
from kd_pipeline.engine.ds_config import load_ds_json, zero_stage
from kd_pipeline.engine.metrics import CONTRIBUTION_PREFIX, MetricsLogger, reduce_sum
from kd_pipeline.engine.stopping import RESUME_EXIT_CODE, StepWatchdog, StopController, install_failure_report
from kd_pipeline.progress import ResumeCheck, check_resume
from kd_pipeline.runtime import Runtime, capture_rng_state, restore_rng_state, seed_everything

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


def log_term_sizes(record: dict[str, float]) -> None:
    """One log line with what each term adds to the loss (``loss_*``: weight x term) and its share of their sum, so
    a term that swamps the others is seen at the first step, not read off metrics.jsonl after the run."""
    contributions = {name.removeprefix(CONTRIBUTION_PREFIX): value for name, value in record.items()
                     if name.startswith(CONTRIBUTION_PREFIX)}
    if not contributions:
        return
    total = sum(abs(value) for value in contributions.values()) or 1.0
    log.info("step 1 loss terms (weight x term): %s = loss %.4g", ", ".join(
        f"{name} {value:.4g} ({100 * abs(value) / total:.0f} %)" for name, value in contributions.items()),
        record.get("loss", float("nan")))


def detached(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """Loss terms as plain floats for logging (detached first: no autograd warning, no graph kept alive)."""
    return {name: float(value.detach()) for name, value in terms.items()}


# ----------------------------------------------------------------------------------------------------- resume


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
    check: ResumeCheck | None = None  # what ``progress.check_resume`` carried over (None on a fresh start)


def prepare_resume(config: Config, runtime: Runtime) -> ResumePoint:
    """Choose the checkpoint (rank 0 verifies it, all ranks use its choice), check it against the config and decide
    how DeepSpeed loads it.

    Collective; call it before ``build_engines`` so that the returned config's ``checkpoint.universal`` reaches the
    student's DeepSpeed config (``load_universal``). When a conversion is needed, rank 0 runs it while the others
    wait (``_convert_on_rank0``).
    """
    folder = agree_on_resume(config, runtime)
    choice = config.checkpoint.universal
    universal, check = False, None
    if folder is not None:
        check = check_resume(folder, config, zero_stage(load_ds_json(config.deepspeed.config)))
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
    return ResumePoint(folder=folder, engine_folder=engine_folder, config=resolved, check=check)


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
    while not all_reduce_floats([1.0 if worker is not None and not worker.is_alive() else 0.0], MAX)[0]:
        time.sleep(CONVERSION_POLL_SECONDS)
    box = [outcome]
    dist.broadcast_object_list(box, src=0)
    if "error" in box[0]:
        raise ckpt.CheckpointError(f"rank 0 could not convert {folder} to a universal checkpoint: {box[0]['error']}")
    return Path(box[0]["path"])


def load_resume(engines: Engines, resume: ResumePoint, runtime: Runtime) -> tuple[ckpt.TrainerState, dict | None]:
    """Load the student engine (module, ZeRO optimizer state, LR scheduler) and return the trainer state and this
    rank's saved state (RNG, recipe progress), the latter ``None`` when the world size changed."""
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


# ----------------------------------------------------------------------------------------------------- session


@dataclasses.dataclass
class Session:
    """What a recipe set up before its loop (``open_session``)."""
    config: Config                 # checkpoint.universal resolved
    runtime: Runtime
    engines: Engines
    state: ckpt.TrainerState       # the global progress (saved in every checkpoint)
    resume: ResumePoint
    rank_state: dict | None        # this rank's saved RNG and recipe progress; None fresh or after a world change
    config_yaml: str               # the resolved config, as written beside the outputs and into checkpoints
    metrics: MetricsLogger
    stopper: StopController
    watchdog: StepWatchdog         # ``with session.watchdog.step():`` around each step of a recipe's loop

    @property
    def new_round(self) -> bool:
        """Stage 2: the saved partial round must be dropped (``progress.check_resume``)."""
        return self.resume.check is not None and self.resume.check.new_round

    def loader_state(self, name: str):
        return load_loader_state(self.resume.folder, name) if self.resume.folder else None

    def restore_rng(self) -> None:
        """After the loaders are built: the saved RNG streams, or fresh per-rank ones."""
        if self.rank_state is not None:
            restore_rng_state(self.rank_state["rng"])
        else:
            seed_everything(self.config.run.seed + self.runtime.rank)

    def save(self, loaders: dict, extra: dict | None = None) -> str:
        """Checkpoint now (collective): RNG states and ``extra`` per rank, every loader's state per rank."""
        return ckpt.save_checkpoint(
            self.engines.student, Path(self.config.run.output_dir) / "checkpoints", self.state,
            rank=self.runtime.rank, world_size=self.runtime.world_size,
            rank_state={"rng": capture_rng_state(), **(extra or {})}, config_yaml=self.config_yaml,
            keep_last=self.config.checkpoint.keep_last,
            loader_states={name: loader.state_dict() for name, loader in loaders.items()})

    def close(self, stopped: bool) -> int:
        """Close the outputs, write ``engine_rank{r}.json`` and return the exit code."""
        self.metrics.close()
        output_dir = Path(self.config.run.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        report = json.dumps(self.engines.partition_report(), indent=1)
        (output_dir / f"engine_rank{self.runtime.rank}.json").write_text(report)
        return RESUME_EXIT_CODE if stopped else 0


def open_session(config: Config, runtime: Runtime, *, init_from: bool = False) -> Session:
    """Resume point (before the engines: their DeepSpeed config follows its choice), engines (identical
    initialisation on every rank; with ``init_from`` a fresh run starts from ``run.init_from``'s weights), the
    progress (loaded when resuming), then the outputs (resolved config, metrics, stop controller)."""
    resume = prepare_resume(config, runtime)
    config = resume.config
    seed_everything(config.run.seed)
    init_weights = ckpt.resolve_init_from(config.run.init_from) if init_from and resume.folder is None else None
    engines = build_engines(config, runtime, init_weights=init_weights)
    state = ckpt.TrainerState(world_size=runtime.world_size, zero_stage=engines.zero_stage, stage=config.run.stage)
    rank_state = None
    if resume.folder is not None:
        state, rank_state = load_resume(engines, resume, runtime)
        log.info("resumed from %s at step %d (run.stage=%s)", resume.engine_folder, state.step, config.run.stage)
    install_failure_report(runtime.rank, state)
    output_dir = Path(config.run.output_dir)
    config_yaml = yaml.safe_dump(config_to_dict(config), sort_keys=False)
    if runtime.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(config_yaml)
    metrics = MetricsLogger(output_dir, enabled=runtime.is_main, total_steps=config.train.max_steps,
                            start_step=state.step)
    return Session(config=config, runtime=runtime, engines=engines, state=state, resume=resume,
                   rank_state=rank_state, config_yaml=config_yaml, metrics=metrics,
                   stopper=StopController(config.run.stop_before_end_minutes),
                   watchdog=StepWatchdog(config.deepspeed.timeout_minutes))


# ----------------------------------------------------------------------------------------------------- the step


class StepClock:
    """One optimizer step's clock: time spent waiting for loaders and tokens through the student, reported as
    ``tokens_per_s`` (all ranks), ``data_wait_frac`` (mean over ranks) and ``step_time_s``."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.start = time.perf_counter()
        self.data_wait = 0.0
        self.tokens = 0

    def next(self, batches: Iterator):
        """``next(batches)``, timed as data wait."""
        start = time.perf_counter()
        item = next(batches)
        self.data_wait += time.perf_counter() - start
        return item

    def count(self, batch: dict) -> None:
        """Count the real (unpadded) tokens of a batch the student runs on."""
        self.tokens += int(batch["attention_mask"].sum())

    def record(self) -> dict[str, float]:
        """Collective (one all-reduce)."""
        elapsed = time.perf_counter() - self.start
        totals = reduce_sum({"tokens": float(self.tokens), "wait": self.data_wait / elapsed})
        return {"tokens_per_s": totals["tokens"] / elapsed, "data_wait_frac": totals["wait"] / self.world_size,
                "step_time_s": elapsed}


class StepEnd:
    """The end-of-step policy of both recipes, in this order:

    1. validate every ``train.eval_every`` steps and at the last step (never with ``train.eval_every=0``); a lower
       ``val_loss`` than any before makes this step ``best``;
    2. log the line (at step 1, every ``run.log_every`` steps, on validation steps and at the last step) and the
       progress bar; at step 1 also one log line with each loss term's size and share of the loss;
    3. stop on a signal or the job's end time (agreed by all ranks), or at ``run.stop_at_step``, which stops once:
       the run that reaches it stops, a run resumed at or past it continues to ``train.max_steps``;
    4. save every ``checkpoint.every_steps`` steps, at the last step, when stopping and on a new best.

    ``__call__`` returns True when the loop must stop (the checkpoint is saved; exit ``RESUME_EXIT_CODE``).
    """

    def __init__(self, session: Session, *, validate: Callable[[], dict[str, float]], save: Callable[[], object]):
        self.session = session
        self.validate = validate
        self.save = save
        self.start_step = session.state.step

    def __call__(self, record: dict[str, float]) -> bool:
        config, state, metrics = self.session.config, self.session.state, self.session.metrics
        step, last = state.step, state.step == config.train.max_steps
        is_best = False
        if config.train.eval_every and (step % config.train.eval_every == 0 or last):
            record.update(self.validate())
            if state.best_val_loss is None or record["val_loss"] < state.best_val_loss:
                state.best_val_loss, state.best_tag, is_best = record["val_loss"], ckpt.tag_for_step(step), True
        if step % config.run.log_every == 0 or "val_loss" in record or last or step == 1:
            metrics.log(step, record)  # step 1 always: a term that dominates the loss shows at once
        if step == 1 and metrics.enabled:  # rank 0 (the record is already reduced over ranks)
            log_term_sizes(record)
        metrics.progress(step, record)
        # Signals need the ranks' agreement (collective); the step limit is the same on every rank (config).
        stop = self.session.stopper.should_stop() or self.start_step < config.run.stop_at_step == step
        if step % config.checkpoint.every_steps == 0 or last or stop or is_best:
            self.save()
        return stop
