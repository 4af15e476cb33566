"""The run configuration: one frozen, typed dataclass tree loaded from YAML plus ``section.key=value`` overrides.

Layout (top to bottom): the sections as dataclasses, each field followed by a one-line docstring (that string is the
``--help`` text and the config reference in README); then loading, validation, overrides and dumping.

Why not OmegaConf/Hydra or jsonargparse: they are not among the chosen dependencies, and what we need is small — strict
unknown-key rejection with a close match, type checks that name the key, and field docstrings as help text.
YAML is parsed with ``yaml.safe_load`` only (configuration is never executed).

Runtime state (rank, device, resolved dtype) is deliberately absent: see ``kd_pipeline.runtime``.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import json
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kd_pipeline.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration problem, worded for the person who wrote the YAML or the override."""


# ----------------------------------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class RunConfig:
    output_dir: str = "runs/default"
    """Folder for checkpoints, metrics.jsonl, TensorBoard events and the resolved config (re-used on resume)."""
    seed: int = 0
    """Seed for python, numpy and torch on every rank (each rank offsets it by its rank)."""
    stage: str = "kd_sft"
    """What to train: `sft` (no teacher), `kd_sft` (stage 1: word-level KD + CE, Table 1's first line) or `minillm` (stage 2: reverse-KL policy gradient + feature alignment + PT loss)."""
    init_from: str = ""
    """Stage 2 start point: a stage-1 output folder (its `best` checkpoint is used) or a checkpoint path."""
    stop_before_end_minutes: float = 0.0
    """Under Slurm, save and exit this many minutes before the job's end time (0 disables)."""
    stop_at_step: int = 0
    """Save and exit with code 75 (resumable) after this step, keeping max_steps' schedule; a run resumed at or past it goes on (0: off)."""
    log_every: int = 1
    """Write a metrics.jsonl line every this many optimizer steps."""


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""
    """A transformers LLaVA directory (e.g. from `kd_pipeline.convert geochat-to-hf`); empty builds `arch` from scratch."""
    arch: str = "tiny"
    """Built-in architecture when `path` is empty: `tiny` (sizes below), `geochat-7b` or `geochat-13b` (meta-device counting)."""
    hidden_size: int = 64
    """LLM hidden size (tiny arch only)."""
    num_layers: int = 2
    """LLM decoder layers (tiny arch only)."""
    num_heads: int = 4
    """LLM attention heads (tiny arch only)."""
    intermediate_size: int = 128
    """LLM MLP width (tiny arch only)."""
    vision_hidden_size: int = 32
    """CLIP tower hidden size (tiny arch only)."""
    vision_layers: int = 2
    """CLIP tower layers (tiny arch only; features come from layer -2)."""
    vision_heads: int = 2
    """CLIP tower attention heads (tiny arch only)."""
    image_size: int = 56
    """Input resolution in pixels (504 for GeoChat)."""
    patch_size: int = 14
    """CLIP patch size (14 for ViT-L/14)."""
    lora: bool = False
    """Train LoRA adapters on the LLM's q/k/v/o/gate/up/down projections instead of all LLM weights."""
    lora_r: int = 64
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA branch (stage 2 refuses a student value > 0: dropout breaks PPO's new/old ratio)."""
    train_projector: bool = True
    """Train the mlp2x_gelu projector (the CLIP tower is always frozen)."""
    gradient_checkpointing: bool = False
    """Recompute LLM activations in the backward pass to save memory."""
    attn_implementation: str = "auto"
    """`auto` (flash_attention_2 when flash-attn and CUDA are present, else sdpa), `sdpa`, `eager` or `flash_attention_2`."""


@dataclass(frozen=True)
class DataConfig:
    shards: str = ""
    """A `data_prep shard` output folder; its manifest.json lists the train and val shards."""
    pt_shards: str = ""
    """A `data_prep pt` output folder: the pre-training corpus D_PT used by stage 2."""
    tokenizer: str = ""
    """Tokenizer folder (LLaMA SentencePiece or tokenizer.json); empty means `student.path`."""
    template: str = "vicuna_v1"
    """Conversation template used to render training samples (`vicuna_v1` as GeoChat trains)."""
    max_length: int = 2048
    """Text tokens kept per sample before the image block is expanded (GeoChat's model_max_length)."""
    num_workers: int = 2
    """DataLoader worker processes per rank."""
    shuffle_buffer: int = 256
    """Samples in the shuffle buffer (holds undecoded bytes)."""
    max_image_pixels: int = 178_956_970
    """Images with more pixels than this are rejected as decompression bombs."""
    packing: bool = True
    """Pack several samples per row of training, validation and D_PT batches (padding-free; position ids restart per sample, attention stays within it): same loss as padding, same samples per step. Stage-2 rollouts are never packed."""


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 100
    """Optimizer steps to run in total (a resumed run runs only what is left)."""
    micro_batch_size: int = 2
    """Samples per rank per forward pass."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    global_batch_size: int = 0
    """Samples per optimizer step the run is designed for (micro_batch_size x grad_accum x ranks): a launch whose ranks give another number is refused before any model loads (0: any)."""
    lr: float = 2e-4
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.0
    """Cosine schedule floor as a fraction of `lr`."""
    warmup_steps: int = 0
    """Linear warm-up steps before the cosine decay."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Gradient norm clipping (0 disables)."""
    eval_every: int = 50
    """Run validation every this many steps and at the last one (0: no validation, no val split needed, no `best`)."""
    eval_batches: int = 0
    """Validation micro-batches per rank (0: the whole val split, equalised across ranks)."""


@dataclass(frozen=True)
class KDConfig:
    alpha_kd: float = 0.5
    """Weight of the word-level KD term; the ground-truth cross-entropy gets 1 - alpha_kd (paper eq. 3)."""
    temperature: float = 1.0
    """Softmax temperature tau of the KD term; the term is scaled by tau^2 (paper eq. 2)."""
    align_weight: float = 0.0
    """Stage-1 weight of the projector-feature alignment (mean squared error, eq. 4-5). 0: Table 1's stage 1 has no alignment (it belongs to stage 2, `minillm.align_weight`); > 0 is the D_al ablation."""
    fused: bool = True
    """Compute KL terms with the chunked fused kernel (never materialises full-vocabulary logits)."""
    chunk_size: int = 0
    """Tokens per chunk in the fused KL kernel (0: about 64 MiB of fp32 logits per chunk on CPU, 256 MiB on CUDA)."""


@dataclass(frozen=True)
class MinillmConfig:
    mix_alpha: float = 0.2
    """Teacher weight alpha of the sampling mixture alpha*p + (1-alpha)*q."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_k: int = 0
    """Sampling top-k (0 disables)."""
    top_p: float = 1.0
    """Sampling nucleus threshold (1 disables)."""
    max_new_tokens: int = 64
    """Longest generated response."""
    rollouts_per_rank: int = 8
    """Rollout buffer size per rank and round (a multiple of train.micro_batch_size; steps may span rounds)."""
    rollout_batch_size: int = 0
    """Prompts decoded together per rank, in rounds and validation (0: rollouts_per_rank); bounds the KV caches. A multiple of train.micro_batch_size."""
    ppo_epochs: int = 4
    """Passes over each rollout buffer."""
    gamma: float = 0.95
    """Discount of the long-term return (MiniLLM code)."""
    weights: str = "per_step"
    """Importance weights: `per_step` q/p~ (MiniLLM code) or `product` of ratios (paper eq. 9)."""
    weight_clip: float = 0.0
    """Upper bound on importance weights (0 disables)."""
    long_term: str = "minillm"
    """Length normalisation: `minillm` (discounted return / remaining tokens, whitened) or `paper` (R_{t+1}/(T-t-1))."""
    clip_eps: float = 0.2
    """PPO clip epsilon on ratio * weight."""
    reward_scaling: float = 0.5
    """Rewards are divided by this before the advantage."""
    reward_clip: float = 100.0
    """Rewards are clipped to +-this."""
    single_step_weight: float = 1.0
    """Weight of the single-step (full-vocabulary reverse KL) term."""
    long_term_weight: float = 1.0
    """Weight of the long-term (PPO-clipped, length-normalised policy-gradient) term; 0 drops it: single-step only, the per-token reverse KL on the mixed samples of GKD-style on-policy distillation."""
    align_weight: float = 1.0
    """Weight of delta_align, the projector-feature alignment (mean squared error, eq. 4-5) on every step's rollout prompts: 1 as in eq. 10 (stage 1's weight is `kd.align_weight`)."""
    kd_ratio: float = 0.5
    """Pre-training loss mix: (1 - kd_ratio) * LM + kd_ratio * forward KD."""
    pt_weight: float = 1.0
    """Weight of the pre-training loss on a D_PT batch each step."""
    gather_params: bool = True
    """Gather ZeRO-3 parameters once per rollout phase (fast) instead of per token (low memory)."""


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 50
    """Save a checkpoint every this many optimizer steps (and always at the end)."""
    keep_last: int = 2
    """Periodic checkpoints kept (the `best` one and the only complete one are never deleted)."""
    resume: str = "auto"
    """`auto` (latest complete checkpoint in output_dir, if any), `none`, or a checkpoint path."""
    universal: str = "auto"
    """Universal-checkpoint conversion on resume: `auto` (when world size changed), `always` or `never`."""


@dataclass(frozen=True)
class DeepSpeedSection:
    config: str = "ds_configs/zero3.json"
    """DeepSpeed JSON; its "auto" values are filled from this run config in one place (kd_pipeline.engine.ds_config)."""
    offload_teacher_params: bool = False
    """Offload the frozen teacher's ZeRO-3 parameters to CPU memory."""
    timeout_minutes: float = 30.0
    """Process-group timeout: a dead or stuck rank fails the job after this long instead of hanging; a rank still
    inside one step after 0.8 x this long first dumps its threads' stacks to stderr."""


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    """Run identity and output."""
    student: ModelConfig = field(default_factory=ModelConfig)
    """The model being trained."""
    teacher: ModelConfig = field(default_factory=lambda: ModelConfig(hidden_size=96, num_layers=3, intermediate_size=192))
    """The frozen model distilled from (ignored by `run.stage=sft`)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Shards, tokenizer and prompt rendering."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation and validation schedule."""
    kd: KDConfig = field(default_factory=KDConfig)
    """Stage-1 loss weights and the fused-kernel settings both stages use."""
    minillm: MinillmConfig = field(default_factory=MinillmConfig)
    """Stage-2 sampling and policy-gradient settings."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint cadence, retention and resume."""
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    """DeepSpeed settings that are not in the JSON."""

    def __post_init__(self) -> None:
        _check_choice("run.stage", self.run.stage, ("sft", "kd_sft", "minillm"))
        _check_choice("checkpoint.universal", self.checkpoint.universal, ("auto", "always", "never"))
        _check_choice("minillm.weights", self.minillm.weights, ("per_step", "product"))
        _check_choice("minillm.long_term", self.minillm.long_term, ("minillm", "paper"))
        _check_choice("data.template", self.data.template, ("vicuna_v1", "llava_v1"))
        for name, model in (("student", self.student), ("teacher", self.teacher)):
            _check_choice(f"{name}.arch", model.arch, ("tiny", "geochat-7b", "geochat-13b"))
            _check_choice(f"{name}.attn_implementation", model.attn_implementation,
                          ("auto", "sdpa", "eager", "flash_attention_2"))
            if model.image_size % model.patch_size:
                raise ConfigError(f"{name}.image_size={model.image_size} is not a multiple of "
                                  f"{name}.patch_size={model.patch_size}")
        for key, value in (("train.max_steps", self.train.max_steps), ("train.micro_batch_size", self.train.micro_batch_size),
                           ("train.grad_accum", self.train.grad_accum), ("checkpoint.every_steps", self.checkpoint.every_steps),
                           ("checkpoint.keep_last", self.checkpoint.keep_last)):
            if value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")
        per_rank = self.train.micro_batch_size * self.train.grad_accum
        if self.train.global_batch_size < 0 or self.train.global_batch_size % per_rank:
            raise ConfigError(f"train.global_batch_size={self.train.global_batch_size} is not a multiple of "
                              f"train.micro_batch_size x train.grad_accum = {per_rank} (0 disables the check)")
        if not 0.0 <= self.kd.alpha_kd <= 1.0:
            raise ConfigError(f"kd.alpha_kd must lie in [0, 1], got {self.kd.alpha_kd}")
        for key, value in (("kd.align_weight", self.kd.align_weight),
                           ("minillm.align_weight", self.minillm.align_weight),
                           ("minillm.single_step_weight", self.minillm.single_step_weight),
                           ("minillm.long_term_weight", self.minillm.long_term_weight),
                           ("minillm.pt_weight", self.minillm.pt_weight)):
            if value < 0:
                raise ConfigError(f"{key} must be >= 0 (a loss weight; 0 turns the term off), got {value}")
        if not 0.0 <= self.minillm.mix_alpha <= 1.0:
            raise ConfigError(f"minillm.mix_alpha must lie in [0, 1], got {self.minillm.mix_alpha}")
        if self.run.stage == "minillm":
            self._check_stage2()

    def _check_stage2(self) -> None:
        if not self.run.init_from and self.checkpoint.resume == "none":
            raise ConfigError("run.stage=minillm needs run.init_from (a stage-1 output folder or checkpoint)")
        rollouts, micro = self.minillm.rollouts_per_rank, self.train.micro_batch_size
        if rollouts < micro or rollouts % micro:
            raise ConfigError(f"minillm.rollouts_per_rank={rollouts} must be a multiple of "
                              f"train.micro_batch_size={micro} (the buffer is split into whole micro-batches)")
        decode_rows = self.minillm.rollout_batch_size
        if decode_rows < 0 or decode_rows % micro:
            raise ConfigError(f"minillm.rollout_batch_size={decode_rows} must be 0 (the whole buffer) or a positive "
                              f"multiple of train.micro_batch_size={micro}")
        if self.minillm.ppo_epochs < 1:
            raise ConfigError(f"minillm.ppo_epochs must be >= 1, got {self.minillm.ppo_epochs}")
        if self.student.lora and self.student.lora_dropout > 0:
            # Rollouts score old log-probs in eval mode; a dropout mask in the policy forward would make the PPO
            # ratio new/old differ from 1 before any update, so it is refused rather than silently changed.
            raise ConfigError(f"student.lora_dropout={self.student.lora_dropout} with run.stage=minillm: stage 2 "
                              f"needs student.lora_dropout=0 (dropout makes PPO's ratio of new to old "
                              f"log-probabilities inconsistent); set student.lora_dropout=0")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}")


# ----------------------------------------------------------------------------------------------------- help text


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass ``cls`` (read from its source with ``ast``)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str)):
            docs[node.target.id] = following.value.value.strip()
    return docs


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def config_reference() -> str:
    """A markdown table of every key, its type, default and docstring (README's config reference)."""
    defaults = Config()
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for section, cls in _section_types().items():
        docs = field_docs(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            value = getattr(getattr(defaults, section), f.name)
            type_name = getattr(hints[f.name], "__name__", str(hints[f.name]))
            lines.append(f"| `{section}.{f.name}` | {type_name} | `{json.dumps(value)}` | {docs.get(f.name, '')} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- loading


def _close_match(word: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(word, candidates, n=1)
    return f" (did you mean {match[0]!r}?)" if match else f" (known: {', '.join(candidates)})"


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against the field type; ints are accepted for floats, lists for tuples."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        item_types = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)) or len(value) != len(item_types):
            raise ConfigError(f"{key} expects a list of {len(item_types)} values, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, t) for i, (v, t) in enumerate(zip(value, item_types)))
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        # YAML 1.1 reads "5e-4" (no dot) as a string; accept it, since every such value is meant as a number.
        try:
            return float(value)
        except ValueError:
            pass
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{key} expects true or false, got {value!r}")
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key} expects an integer, got {value!r}")
    if annotation in (float, str) and not isinstance(value, annotation):
        raise ConfigError(f"{key} expects a {annotation.__name__}, got {value!r}")
    return value


def _build_section(section: str, cls: type, values: Any) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"section {section!r} must be a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            raise ConfigError(f"unknown key {section}.{key}{_close_match(key, names)}")
    return {key: _coerce(f"{section}.{key}", value, hints[key]) for key, value in values.items()}


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Validate a nested mapping (as read from YAML) into a ``Config``; every problem names its key."""
    sections = _section_types()
    for section in raw:
        if section not in sections:
            raise ConfigError(f"unknown section {section!r}{_close_match(section, list(sections))}")
    defaults = Config()
    built = {}
    for section, cls in sections.items():
        values = _build_section(section, cls, raw.get(section) or {})
        built[section] = dataclasses.replace(getattr(defaults, section), **values)
    try:
        return Config(**built)
    except TypeError as error:  # a dataclass signature mismatch would be our bug, not the user's
        raise ConfigError(str(error)) from error


def parse_overrides(overrides: list[str]) -> dict[str, dict[str, Any]]:
    """``["train.lr=1e-4", "student.lora=true"]`` -> nested mapping; values parsed as YAML scalars/lists."""
    nested: dict[str, dict[str, Any]] = {}
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, text = item.split("=", 1)
        section, key = dotted.split(".", 1)
        nested.setdefault(section, {})[key] = yaml.safe_load(text) if text != "" else ""
    return nested


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (or nothing, for defaults), apply overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {error}") from error
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
    for section, values in parse_overrides(overrides or []).items():
        if not isinstance(raw.get(section, {}), dict):
            raise ConfigError(f"section {section!r} in {path} is not a mapping")
        raw.setdefault(section, {}).update(values)
    return config_from_dict(raw)


def config_to_dict(config: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML/JSON output and checkpoints."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def dump_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (readable by ``load_config``)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


def help_text() -> str:
    """``--help`` epilog: every ``section.key`` with its default and docstring."""
    defaults = Config()
    out = ["configuration keys (override with section.key=value):"]
    for section, cls in _section_types().items():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            value = getattr(getattr(defaults, section), f.name)
            out.append(f"  {section}.{f.name} = {json.dumps(value)}\n      {docs.get(f.name, '')}")
    return "\n".join(out)
