"""The per-rank memory model behind ``kd_pipeline.plan``: counts from meta-device models, and the rows a plan adds up.

Counts come from meta-device models built with ``kd_pipeline.models`` (the folder's ``config.json`` for ``path``;
a ``path`` with no config.json yet, i.e. before ``kd_pipeline.convert`` ran, falls back to the ``arch`` preset
and the plan says so; ``llava_config`` for ``tiny``), prepared as training prepares them (frozen CLIP tower,
projector by config, LoRA or the full LLM), plus the feature map P (``losses.FeatureProjector``, trainable). The
ZeRO settings are read from the run's DeepSpeed JSON, resolved as training resolves it (``engine.ds_config``; the
teacher's with ``for_teacher``). Mixed precision is assumed (16-bit parameters, fp32 masters: GPU runs are bf16).

Rows (bytes; GPU per rank, CPU per node, as DeepSpeed's estimators report), each in a phase: ``all`` (held
throughout), ``step`` (the training step) or ``rollout`` (stage 2's decoding). A stage's peak is ``all`` plus
the larger of its phases (``phase_totals``).

- student trainable states: DeepSpeed's own estimator (``estimate_zero3_model_states_mem_needs`` with the trainable
  count and the largest layer; ``estimate_zero2_model_states_mem_needs`` for stages 1-2) with zero_init=True and
  the run's offload. **LoRA**: the estimator assumes every parameter trains (18 B/param on GPU without offload);
  it is called with the *trainable* count, the largest layer staying the largest of the whole model (what ZeRO-3
  gathers). Its CPU figure without offload is the peak while loading under ``zero.Init``, not a steady need.
- student frozen parameters (CLIP tower, LoRA base weights) and the teacher: 2 B/param, divided over ranks under
  ZeRO-3 (to CPU with parameter offload); the teacher's LM-head copy: 2 B x V x H_t on every rank (fused KL).
- ZeRO-3 buffers: parameters gathered at once are bounded by ``stage3_max_live_parameters`` (capped at the larger
  engine's size) plus one ``stage3_prefetch_bucket_size``, 2 B each, both from the resolved DeepSpeed JSON.
- CUDA/NCCL context: a stated constant (``plan --context-gib``, default 1.5: the CUDA context with torch's kernels
  and cuBLAS workspaces, about 0.5-1 GiB, plus NCCL's channel buffers for 8 local peers); not measured here.
- student activations, Korthikanti et al. 2022 (eq. 1, 16-bit, no tensor/sequence parallelism), per layer
  ``s*b*h*(34 + 5*a*s/h)`` with ``s = data.max_length + image tokens - 1``; memory-efficient attention (every
  backend but ``eager``) never stores the s x s scores: ``34*s*b*h``; gradient checkpointing keeps ``2*s*b*h`` per
  layer plus one layer's full set. The teacher's outputs kept for the loss (last hidden states and projector
  features, 2 B each) count too.
- Stage 2 (``run.stage=minillm``), rollout phase: with ``minillm.gather_params`` both models' full 16-bit weights
  on every rank (``sampling.gathered_for_decoding``), the KV caches of the rollouts decoded together for
  ``prompt + minillm.max_new_tokens`` positions (prompt = ``data.loaders.MAX_PROMPT_TOKENS`` text tokens + image
  tokens - 1; 2 (K, V) x layers x kv width x 2 B per position and model) and the prefill's working memory (one
  layer's MLP of the larger model). Step phase: the policy forward's activations on rollout sequences plus those
  of the D_PT batch (``data.max_length`` text tokens; both in one forward), the teacher's outputs for both. Both
  phases hold the rollout buffer (teacher hidden states and features per rollout).
- Checkpoint (``checkpoint_size``): what one save writes, all ranks together: ZeRO's fp32 master and two Adam
  moments per trainable parameter, the frozen parameters' 16-bit partitions, stage 2's rollout buffers.

Not counted: the vision towers' activations (frozen, no_grad), the fused KL's chunks (``kd.chunk_size``: about
256 MiB on CUDA), communication buckets, and what the allocator reserves beyond the plan's 10 % margin.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from kd_pipeline.config import Config, ConfigError, ModelConfig

log = logging.getLogger(__name__)

PARAM_BYTES = 2
"""Bytes of one 16-bit (bf16) parameter."""
CHECKPOINT_BYTES_PER_TRAINABLE = 12
"""ZeRO checkpoint bytes per trainable parameter: fp32 master weight + Adam's two fp32 moments."""
GIB = 1024 ** 3


@dataclass(frozen=True)
class ModelShape:
    """What the memory maths needs from one model."""
    total: int
    """Parameters (shared ones once)."""
    trainable: int
    """Parameters with ``requires_grad`` (what the optimizer holds states for)."""
    largest_layer: int
    """Most parameters owned directly by one module: the unit ZeRO-3 gathers (DeepSpeed's ``model_to_params``)."""
    hidden_size: int
    num_layers: int
    num_heads: int
    vocab_size: int
    intermediate_size: int
    kv_width: int
    """Key (= value) features per position and layer: ``num_key_value_heads x head_dim``."""


@dataclass(frozen=True)
class ZeroSettings:
    stage: int
    offload_optimizer: bool
    offload_param: bool
    max_live_parameters: int
    prefetch_bucket_size: int


@dataclass(frozen=True)
class Counts:
    """Everything ``memory_rows`` needs that takes building models: computed once per plan."""
    student: ModelShape
    teacher: ModelShape | None
    student_zero: ZeroSettings
    teacher_zero: ZeroSettings | None
    vocab_size: int
    image_tokens: int
    notes: tuple[str, ...]


# ----------------------------------------------------------------------------------------------------- counting


def meta_llava(model_cfg: ModelConfig, *, vocab_size: int, image_token_id: int, role: str = "student",
               notes: list[str] | None = None):
    """The model ``create_model`` would build, on the meta device and prepared for training (LoRA included).

    A ``path`` without config.json (not converted yet) is counted as its ``arch`` preset, noted in ``notes``."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from kd_pipeline.models import llava_config, meta_model, num_image_tokens, prepare_model
    from kd_pipeline.models.geochat import LLM_PRESETS

    arch = model_cfg.arch
    if model_cfg.path and not (Path(model_cfg.path) / "config.json").is_file():
        if arch not in LLM_PRESETS:
            raise ConfigError(f"{role}.path={model_cfg.path} has no config.json yet and {role}.arch={arch!r} is not "
                              f"a GeoChat preset: convert the checkpoint first, or set {role}.arch to one of "
                              f"{', '.join(LLM_PRESETS)} to plan before converting")
        (notes if notes is not None else []).append(
            f"{role}.path={model_cfg.path} has no config.json yet: counted as {role}.arch={arch}")
    if model_cfg.path and (Path(model_cfg.path) / "config.json").is_file():
        config = LlavaConfig.from_pretrained(model_cfg.path, local_files_only=True)
        # load_model interpolates the tower's position table to the run's resolution: count that table.
        config.vision_config.image_size = model_cfg.image_size
        config.image_seq_length = num_image_tokens(model_cfg)
        with torch.device("meta"):
            model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    elif arch in LLM_PRESETS:
        model = meta_model(arch, image_size=model_cfg.image_size, vocab_size=vocab_size,
                           image_token_id=image_token_id)
    else:
        config = llava_config(model_cfg, vocab_size=vocab_size, image_token_id=image_token_id)
        with torch.device("meta"):
            model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    # peft creates its adapter weights on the default device: keep them on meta too (seconds instead of minutes).
    with torch.device("meta"):
        return prepare_model(model, model_cfg)


def feature_map(student_hidden: int, teacher_hidden: int):
    """P as ``StudentModule`` builds it, on the meta device."""
    import torch

    from kd_pipeline.losses import FeatureProjector

    with torch.device("meta"):
        return FeatureProjector(student_hidden, teacher_hidden)


def shape_of(modules: list, *, frozen: bool = False) -> ModelShape:
    """Counts over ``modules`` (the first one a LLaVA model or its peft wrapper); ``frozen`` ignores requires_grad.

    DeepSpeed's own ``model_to_params`` de-duplicates parameters by ``data_ptr``, which is 0 for every meta tensor,
    so the same counts are taken here by identity.
    """
    from kd_pipeline.models import unwrap_model

    seen: dict = {}
    largest = 0
    for module in modules:
        for parameter in module.parameters():
            seen.setdefault(id(parameter), parameter)
        for sub in module.modules():
            largest = max(largest, sum(p.numel() for p in sub.parameters(recurse=False)))
    total = sum(p.numel() for p in seen.values())
    trainable = 0 if frozen else sum(p.numel() for p in seen.values() if p.requires_grad)
    text = unwrap_model(modules[0]).config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return ModelShape(total=total, trainable=trainable, largest_layer=largest, hidden_size=text.hidden_size,
                      num_layers=text.num_hidden_layers, num_heads=text.num_attention_heads,
                      vocab_size=text.vocab_size, intermediate_size=text.intermediate_size,
                      kv_width=kv_heads * head_dim)


def vocabulary(config: Config) -> tuple[int, int]:
    """(rows, ``<image>`` id) from the run's tokenizer when it is at hand, else GeoChat's 32001 / 32000."""
    from kd_pipeline.models import GEOCHAT_TEXT_VOCAB

    folder = config.data.tokenizer or config.student.path
    if folder and Path(folder).is_dir() and any(Path(folder).iterdir()):
        from kd_pipeline.tokenizer import image_token_id, load_tokenizer

        tokenizer = load_tokenizer(folder)
        return len(tokenizer), image_token_id(tokenizer)
    log.info("no tokenizer folder at hand: counting GeoChat's %d rows + <image>", GEOCHAT_TEXT_VOCAB)
    return GEOCHAT_TEXT_VOCAB + 1, GEOCHAT_TEXT_VOCAB


def zero_settings(ds_config: dict) -> ZeroSettings:
    from kd_pipeline.engine.ds_config import zero_stage

    zero = ds_config.get("zero_optimization", {})

    def offloaded(key: str) -> bool:
        return zero.get(key, {}).get("device", "none") in ("cpu", "nvme")

    return ZeroSettings(zero_stage(ds_config), offloaded("offload_optimizer"), offloaded("offload_param"),
                        int(float(zero.get("stage3_max_live_parameters", 1e9))),
                        int(float(zero.get("stage3_prefetch_bucket_size", 5e7))))


def count_models(config: Config, *, world_size: int) -> Counts:
    """Build the meta models once and read the ZeRO settings both engines will run with."""
    import torch

    from kd_pipeline.engine.ds_config import resolve_ds_config
    from kd_pipeline.models import num_image_tokens

    notes: list[str] = []
    vocab_size, image_id = vocabulary(config)
    student_llava = meta_llava(config.student, vocab_size=vocab_size, image_token_id=image_id, notes=notes)
    student_modules = [student_llava]
    teacher = teacher_zero = None
    if config.run.stage != "sft":
        teacher = shape_of([meta_llava(config.teacher, vocab_size=vocab_size, image_token_id=image_id,
                                       role="teacher", notes=notes)], frozen=True)
        student_modules.append(feature_map(shape_of([student_llava]).hidden_size, teacher.hidden_size))
        teacher_zero = zero_settings(resolve_ds_config(config, world_size=world_size, dtype=torch.bfloat16,
                                                       hidden_size=teacher.hidden_size, for_teacher=True))
    student = shape_of(student_modules)
    student_zero = zero_settings(resolve_ds_config(config, world_size=world_size, dtype=torch.bfloat16,
                                                   hidden_size=student.hidden_size))
    return Counts(student=student, teacher=teacher, student_zero=student_zero, teacher_zero=teacher_zero,
                  vocab_size=vocab_size, image_tokens=num_image_tokens(config.student), notes=tuple(notes))


# ----------------------------------------------------------------------------------------------------- maths


def trainable_states(trainable: int, largest_layer: int, zero: ZeroSettings, *, gpus_per_node: int,
                     num_nodes: int) -> tuple[int, int]:
    """(CPU bytes per node, GPU bytes per rank) from DeepSpeed's estimator for ``trainable`` parameters."""
    if zero.stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            trainable, largest_layer, num_gpus_per_node=gpus_per_node, num_nodes=num_nodes,
            cpu_offload=zero.offload_optimizer, cpu_offload_params=zero.offload_param, zero_init=True)
        return cpu, gpu
    if zero.stage in (1, 2):
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        return estimate_zero2_model_states_mem_needs(trainable, num_gpus_per_node=gpus_per_node, num_nodes=num_nodes,
                                                     cpu_offload=zero.offload_optimizer)
    raise ConfigError(f"ZeRO stage {zero.stage} has no DeepSpeed estimator: plan a stage 1, 2 or 3 config")


def frozen_params(count: int, zero: ZeroSettings, *, world_size: int, num_nodes: int) -> tuple[int, int]:
    """(CPU bytes per node, GPU bytes per rank) of 16-bit parameters that have no gradients or optimizer states."""
    if zero.stage == 3 and zero.offload_param:
        return PARAM_BYTES * count // num_nodes, 0
    if zero.stage == 3:
        return 0, PARAM_BYTES * count // world_size
    return 0, PARAM_BYTES * count


def activation_bytes(*, seq_len: int, micro_batch: int, hidden: int, heads: int, layers: int,
                     flash: bool, recompute: bool) -> int:
    """Korthikanti et al. 2022 (see the module docstring): stored activations of all decoder layers, in bytes."""
    sbh = seq_len * micro_batch * hidden
    attention_scores = 0 if flash else 5 * heads * seq_len * seq_len * micro_batch  # the 5*a*s/h term times s*b*h
    one_layer = 34 * sbh + attention_scores
    if recompute:
        return 2 * sbh * layers + one_layer
    return one_layer * layers


def kv_cache_bytes(shape: ModelShape, *, sequences: int, positions: int) -> int:
    """Keys and values of every layer for ``sequences`` x ``positions``, 16-bit."""
    return 2 * shape.num_layers * shape.kv_width * PARAM_BYTES * sequences * positions


def rollouts_decoded_together(config: Config) -> tuple[int, str]:
    """How many rollouts one decode holds KV caches for, and the key that says so.

    Hook: ``minillm.rollout_batch_size`` (rollouts decoded together) when the config tree has it; without it the
    plan assumes the whole buffer, ``minillm.rollouts_per_rank``, is decoded at once (an upper bound)."""
    together = getattr(config.minillm, "rollout_batch_size", 0)
    if together:
        return min(together, config.minillm.rollouts_per_rank), "minillm.rollout_batch_size"
    return config.minillm.rollouts_per_rank, "minillm.rollouts_per_rank"


def rollout_positions(config: Config, image_tokens: int) -> tuple[int, int]:
    """(prompt positions, prompt + response positions) of one stage-2 rollout at its longest."""
    from kd_pipeline.data.loaders import MAX_PROMPT_TOKENS

    prompt = MAX_PROMPT_TOKENS + image_tokens - 1
    return prompt, prompt + config.minillm.max_new_tokens


# ----------------------------------------------------------------------------------------------------- rows


def _row(name: str, phase: str, gpu: int, *, cpu: int = 0, params: int = 0, how: str) -> dict:
    return {"name": name, "phase": phase, "params": params, "gpu": gpu, "cpu": cpu, "how": how}


def memory_rows(config: Config, counts: Counts, *, world_size: int, gpus_per_node: int, num_nodes: int,
                context_bytes: int) -> list[dict]:
    """Every row of the plan (see the module docstring), for the config's own micro-batch."""
    student, teacher, zero = counts.student, counts.teacher, counts.student_zero
    states_cpu, states_gpu = trainable_states(student.trainable, student.largest_layer, zero,
                                              gpus_per_node=gpus_per_node, num_nodes=num_nodes)
    frozen_cpu, frozen_gpu = frozen_params(student.total - student.trainable, zero, world_size=world_size,
                                           num_nodes=num_nodes)
    stage2 = config.run.stage == "minillm"
    rows = [
        _row("student trainable states", "all", states_gpu, cpu=states_cpu, params=student.trainable,
             how=f"DeepSpeed ZeRO-{zero.stage} estimator on the trainable count"),
        _row("student frozen params", "all", frozen_gpu, cpu=frozen_cpu, params=student.total - student.trainable,
             how="2 B/param, no grads or optimizer"),
    ]
    if teacher is not None:
        teacher_cpu, teacher_gpu = frozen_params(teacher.total, counts.teacher_zero, world_size=world_size,
                                                 num_nodes=num_nodes)
        head = counts.vocab_size * teacher.hidden_size
        rows += [
            _row("teacher params (inference)", "all", teacher_gpu, cpu=teacher_cpu, params=teacher.total,
                 how=f"2 B/param / {world_size if counts.teacher_zero.stage == 3 else 1} rank(s), no grads"),
            _row("teacher LM-head copy", "all", PARAM_BYTES * head, params=head,
                 how="2 B x V x H_t on every rank (fused KL)"),
        ]
    if zero.stage == 3:
        largest_engine = max(student.total, teacher.total if teacher is not None else 0)
        live = min(zero.max_live_parameters, largest_engine)
        rows.append(_row("ZeRO-3 live params + prefetch", "step" if stage2 and config.minillm.gather_params else "all",
                         PARAM_BYTES * (live + zero.prefetch_bucket_size),
                         how=f"2 B x (min(stage3_max_live_parameters {zero.max_live_parameters:.3g}, engine) "
                             f"+ stage3_prefetch_bucket_size {zero.prefetch_bucket_size:.3g})"))
    rows.append(_row("CUDA/NCCL context", "all", context_bytes,
                     how="stated constant (plan --context-gib), not measured"))

    flash = config.student.attn_implementation != "eager"
    recompute = config.student.gradient_checkpointing
    micro = config.train.micro_batch_size
    dims = dict(hidden=student.hidden_size, heads=student.num_heads, layers=student.num_layers, flash=flash,
                recompute=recompute)
    setting = f"{'flash/sdpa' if flash else 'eager'}, recompute {'on' if recompute else 'off'}"
    if not stage2:
        seq_len = config.data.max_length + counts.image_tokens - 1
        rows.append(_row("student activations", "step", activation_bytes(seq_len=seq_len, micro_batch=micro, **dims),
                         how=f"Korthikanti: b={micro} s={seq_len}, {setting}"))
        if teacher is not None:
            rows.append(_row("teacher outputs for the loss", "step",
                             PARAM_BYTES * micro * (seq_len + counts.image_tokens) * teacher.hidden_size,
                             how="last hidden states + projector features, 2 B x b x (s + image tokens) x H_t"))
        return rows
    return rows + _stage2_rows(config, counts, micro=micro, dims=dims, setting=setting)


def _stage2_rows(config: Config, counts: Counts, *, micro: int, dims: dict, setting: str) -> list[dict]:
    student, teacher = counts.student, counts.teacher
    prompt, positions = rollout_positions(config, counts.image_tokens)
    together, key = rollouts_decoded_together(config)
    response = config.minillm.max_new_tokens
    rows = []
    if config.minillm.gather_params:
        rows += [_row("gathered student (decoding)", "rollout", PARAM_BYTES * student.total, params=student.total,
                      how="minillm.gather_params: full 16-bit weights on every rank"),
                 _row("gathered teacher (decoding)", "rollout", PARAM_BYTES * teacher.total, params=teacher.total,
                      how="minillm.gather_params: full 16-bit weights on every rank")]
    kv = kv_cache_bytes(student, sequences=together, positions=positions) + \
        kv_cache_bytes(teacher, sequences=together, positions=positions)
    larger = max((student, teacher), key=lambda shape: shape.intermediate_size)
    rows += [
        _row("rollout KV caches", "rollout", kv,
             how=f"{together} rollouts ({key}) x {positions} positions (prompt {prompt} + {response} new), "
                 f"both models"),
        _row("prefill working memory", "rollout",
             PARAM_BYTES * together * prompt * (2 * larger.intermediate_size + larger.hidden_size),
             how="one MLP of the larger model over the prompts: 2 B x n x P x (2 I + H)"),
        _row("rollout buffer", "all",
             PARAM_BYTES * config.minillm.rollouts_per_rank * (response + counts.image_tokens) * teacher.hidden_size,
             how="teacher hidden states + features per rollout, 2 B x rollouts_per_rank x (T + image tokens) x H_t"),
    ]
    rows += [
        _row("student activations", "step", activation_bytes(seq_len=positions, micro_batch=micro, **dims) +
             activation_bytes(seq_len=config.data.max_length, micro_batch=micro, **dims),
             how=f"Korthikanti: b={micro}, rollouts s={positions} + D_PT s={config.data.max_length}, {setting}"),
        _row("teacher outputs for the loss", "step",
             PARAM_BYTES * micro * (config.data.max_length + counts.image_tokens) * teacher.hidden_size,
             how="D_PT hidden states + projector features, 2 B x b x (s + image tokens) x H_t"),
    ]
    return rows


def phase_totals(rows: list[dict]) -> dict[str, int]:
    """GPU bytes per rank of each phase (``all`` included in each) and ``peak``, the largest."""
    shared = sum(row["gpu"] for row in rows if row["phase"] == "all")
    phases = sorted({row["phase"] for row in rows} - {"all"}) or ["step"]
    totals = {phase: shared + sum(row["gpu"] for row in rows if row["phase"] == phase) for phase in phases}
    return {**totals, "peak": max(totals.values())}


def checkpoint_size(config: Config, counts: Counts, *, world_size: int) -> dict:
    """Bytes one save writes, all ranks together: ZeRO states of the trainable parameters, the frozen ones'
    16-bit partitions, and stage 2's per-rank rollout buffers (``rank_<r>.pt``)."""
    student = counts.student
    engine = CHECKPOINT_BYTES_PER_TRAINABLE * student.trainable + PARAM_BYTES * (student.total - student.trainable)
    buffers = 0
    if config.run.stage == "minillm":
        buffers = world_size * PARAM_BYTES * config.minillm.rollouts_per_rank * (
            config.minillm.max_new_tokens + counts.image_tokens) * counts.teacher.hidden_size
    return {"bytes": engine + buffers, "engine": engine, "rank_files": buffers,
            "per_rank": (engine + buffers) // world_size}
