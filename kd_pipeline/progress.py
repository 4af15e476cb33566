"""A run's progress between checkpoints, typed, and what happens when a resumed run's config disagrees with it.

Two records, each saved and restored in one place:
- ``checkpoint.TrainerState`` (``trainer_state.json``): steps done, best validation loss and tag, world size, ZeRO
  stage, ``run.stage``, and stage 2's ``rollout_round`` (the round in progress; it seeds that round's PPO order).
- ``RolloutProgress`` (below; stage 2, per rank inside ``rank_{r}.pt``): the sampler's generator, the current
  round's buffer, the position in it and the round's statistics. ``payload``/``restore`` are its only writer and
  reader.

When config and checkpoint disagree (``check_resume``, called before any model is built; torchtune states the same
kind of rules for its ``TrainingProgress``):
- ``run.stage``, the student's ZeRO stage, or its shapes and trainable set (``RESHAPING_KEYS``) differ: refused,
  with the fix in the message (DeepSpeed could not load the tensors, or the progress belongs to another objective);
- the world size differs: carried over through a universal checkpoint (``checkpoint.universal``); RNG streams and
  the rollout round restart (``recipes.common``);
- stage 2's round layout (``ROUND_KEYS``) or any ``teacher.*`` setting differs: the saved partial round (laid out
  and scored for the old settings) is dropped and a new round starts, with a warning;
- anything else (learning rate, max_steps, schedules, cadences, seed, sampling knobs, ...): the config wins; each
  difference is logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from kd_pipeline.checkpoint import CheckpointError, load_trainer_state
from kd_pipeline.config import Config, config_to_dict

log = logging.getLogger(__name__)

RESHAPING_KEYS = tuple(f"student.{name}" for name in (
    "arch", "hidden_size", "num_layers", "num_heads", "intermediate_size", "vision_hidden_size", "vision_layers",
    "vision_heads", "image_size", "patch_size", "lora", "lora_r", "train_projector"))
"""Student settings that change the checkpoint's tensors or which of them train: DeepSpeed could not load it."""
ROUND_KEYS = ("train.micro_batch_size", "minillm.rollouts_per_rank", "minillm.ppo_epochs")
"""Stage-2 settings the saved buffer was laid out for; a change (or any ``teacher.*`` change) starts a new round."""
RESOLVED_PER_RUN = ("checkpoint.universal",)
"""Keys every run resolves for itself (``auto`` becomes ``always``/``never``): never a disagreement."""


@dataclass(frozen=True)
class ResumeCheck:
    """The outcome of ``check_resume`` for a checkpoint that may be resumed."""
    new_round: bool                                            # stage 2: drop the saved partial round
    config_wins: dict[str, tuple] = field(default_factory=dict)  # key -> (checkpoint value, this run's value)


def _flatten(sections: dict) -> dict[str, object]:
    return {f"{section}.{key}": value for section, values in sections.items() if isinstance(values, dict)
            for key, value in values.items()}


def _saved_config(folder: Path) -> dict[str, object]:
    """The checkpoint's config.yaml as dotted keys, defaults filled in for keys it predates (no validation: a rule
    added since must not make an old checkpoint unreadable)."""
    path = folder / "config.yaml"
    try:
        saved = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise CheckpointError(f"{path} is unreadable ({error}); resume from another checkpoint") from error
    return {**_flatten(config_to_dict(Config())), **_flatten(saved)}


def check_resume(folder: Path, config: Config, zero_stage: int) -> ResumeCheck:
    """Apply the rules of the module docstring to resuming ``folder`` with ``config`` (whose student ZeRO stage is
    ``zero_stage``): raise ``CheckpointError`` for a refused difference, else say what is carried over."""
    state = load_trainer_state(folder)
    if state.stage != config.run.stage:
        raise CheckpointError(
            f"{folder} was written by run.stage={state.stage} and this run is run.stage={config.run.stage}: each "
            f"stage needs its own run.output_dir (stage 2 starts from stage 1 with run.init_from=<stage-1 folder>), "
            f"or set checkpoint.resume=none to start this stage over in this folder")
    if state.zero_stage != zero_stage:
        raise CheckpointError(
            f"{folder} holds ZeRO stage {state.zero_stage} shards and {config.deepspeed.config} asks for stage "
            f"{zero_stage}: resume with the DeepSpeed config it was written with")
    saved, current = _saved_config(folder), _flatten(config_to_dict(config))
    changed = {key: (saved[key], value) for key, value in current.items()
               if key in saved and saved[key] != value and key not in RESOLVED_PER_RUN}
    reshaped = [key for key in RESHAPING_KEYS if key in changed]
    if reshaped:
        details = ", ".join(f"{key}={changed[key][0]!r} there, {changed[key][1]!r} here" for key in reshaped)
        raise CheckpointError(f"{folder} was written for another student ({details}): DeepSpeed cannot load its "
                              f"tensors; use the settings it was written with, or another run.output_dir")
    round_changes = [key for key in changed if config.run.stage == "minillm"
                     and (key in ROUND_KEYS or key.startswith("teacher."))]
    new_round = bool(round_changes)
    if new_round:
        log.warning("%s changed since %s: the saved partial rollout round is dropped and a new round starts",
                    ", ".join(round_changes), folder.name)
    config_wins = {key: values for key, values in changed.items() if key not in round_changes}
    for key, (was, now) in config_wins.items():
        log.info("resume: %s was %r in %s; this run's %r is used", key, was, folder.name, now)
    return ResumeCheck(new_round=new_round, config_wins=config_wins)


@dataclass
class RolloutProgress:
    """Stage 2's per-rank progress inside the current rollout round; the recipe's loop state."""
    generator: torch.Generator                    # the sampler's only source of randomness
    buffer: list[dict] | None = None              # the round's micro-batches (tensors on the device); None between
    position: int = 0                             # micro-batches of the round already trained on
    round_stats: dict[str, float] = field(default_factory=dict)  # the round's statistics, reduced over ranks

    def payload(self) -> dict:
        """What ``rank_{r}.pt`` stores (tensors on the CPU, plain types otherwise: loadable with weights_only)."""
        buffer = None if self.buffer is None else [
            {key: value.cpu() if isinstance(value, torch.Tensor) else value for key, value in entry.items()}
            for entry in self.buffer]
        return {"generator_state": self.generator.get_state(), "buffer": buffer, "position": self.position,
                "round_stats": dict(self.round_stats)}

    def restore(self, payload: dict, device: torch.device, *, new_round: bool) -> None:
        """Continue from ``payload``; with ``new_round`` keep only the generator (see ``check_resume``). Rank files
        written before this record existed stored the same fields flat, the generator under "generator"."""
        self.generator.set_state(payload["generator_state"] if "generator_state" in payload else payload["generator"])
        if new_round or payload.get("buffer") is None:
            return
        self.buffer = [{key: value.to(device) if isinstance(value, torch.Tensor) else value
                        for key, value in entry.items()} for entry in payload["buffer"]]
        self.position, self.round_stats = int(payload["position"]), dict(payload["round_stats"])
