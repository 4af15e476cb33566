"""Per-rank memory plan of a run before it is launched: model states of student and teacher, plus activations.

Runbook::

    python -m kd_pipeline.plan --config configs/geochat_13b_to_7b.yaml --world-size 8
    python -m kd_pipeline.plan student.arch=geochat-7b teacher.arch=geochat-13b student.image_size=504 \
        teacher.image_size=504 --world-size 8 [--json]

Counts come from meta-device models built with ``kd_pipeline.models`` (``meta_model`` for the GeoChat presets,
``llava_config`` for ``tiny``, the folder's ``config.json`` for ``path``), prepared as training prepares them
(frozen CLIP tower, projector by config, LoRA or the full LLM), plus the feature map P (``losses.FeatureProjector``,
trainable). The ZeRO stage and offload settings are read from the run's DeepSpeed JSON, resolved as training
resolves it (``engine.ds_config``; the teacher's with ``for_teacher``). Mixed precision is assumed (16-bit
parameters, fp32 masters: GPU runs are bf16).

How each row is computed (bytes; GPU per rank, CPU per node, as DeepSpeed's estimators report):

- student trainable states: DeepSpeed's own estimator (``estimate_zero3_model_states_mem_needs`` with the trainable
  count and the largest layer; ``estimate_zero2_model_states_mem_needs`` for stages 1-2) with zero_init=True and
  the run's optimizer/parameter offload. **LoRA**: the estimator assumes every parameter trains (16-bit param and
  grad, fp32 master and Adam moments: 18 B/param on GPU without offload). We call it with the *trainable* count
  only; the largest layer stays the largest of the whole model (that is what ZeRO-3 gathers).
  Its CPU figure without any offload is the peak while loading under ``zero.Init`` (largest layer x 4 B per GPU
  process x 1.5), not a steady-state need.
- student frozen parameters (CLIP tower, LoRA base weights): 2 B x N_frozen, divided over ranks under ZeRO-3
  (to CPU with parameter offload); no gradients, no optimizer states. This is the estimator's 16-bit parameter
  component alone.
- teacher parameters, inference only: 2 B x N_teacher / world under ZeRO-3 (2 B x N_teacher per rank below it;
  to CPU with ``deepspeed.offload_teacher_params``); no gradients, no optimizer states.
- teacher LM-head copy: 2 B x V x H_teacher on every rank (``TeacherModule.gather_head`` keeps it for the fused KL).
- student activations, Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
  eq. 1, 16-bit activations, no tensor/sequence parallelism), per decoder layer:
  ``s*b*h*(34 + 5*a*s/h)`` bytes with ``s = data.max_length + image tokens - 1`` (the ``<image>`` token is replaced
  by the image features), ``b`` = micro-batch, ``h`` = hidden size, ``a`` = heads. Memory-efficient attention
  (``sdpa``/flash-attn, every backend but ``eager``) never stores the s x s scores: ``34*s*b*h``. Gradient
  checkpointing (full recomputation) keeps each layer's input, ``2*s*b*h`` per layer, plus one layer's full set
  during its recomputation. LLaMA's SwiGLU MLP and RMSNorm differ slightly from the GPT block the formula counts.

Not counted: the CUDA context and allocator fragmentation, the vision towers' and the teacher's forward working
memory (no_grad: one layer at a time), parameters ZeRO-3 keeps live while prefetching (bounded by
``stage3_max_live_parameters``), the fused KL chunks and communication buckets.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from kd_pipeline.config import Config, ConfigError, ModelConfig, help_text, load_config
from kd_pipeline.errors import user_errors_exit

log = logging.getLogger(__name__)

PARAM_BYTES = 2
"""Bytes of one 16-bit (bf16) parameter."""
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


@dataclass(frozen=True)
class ZeroSettings:
    stage: int
    offload_optimizer: bool
    offload_param: bool


# ----------------------------------------------------------------------------------------------------- counting


def meta_llava(model_cfg: ModelConfig, *, vocab_size: int, image_token_id: int) -> nn.Module:
    """The model ``create_model`` would build, on the meta device and prepared for training (LoRA included)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from kd_pipeline.models import llava_config, meta_model, num_image_tokens, prepare_model
    from kd_pipeline.models.geochat import LLM_PRESETS

    if model_cfg.path:
        config_file = Path(model_cfg.path) / "config.json"
        if not config_file.is_file():
            raise ConfigError(f"{model_cfg.path} has no config.json: not a transformers LLaVA folder")
        config = LlavaConfig.from_pretrained(model_cfg.path, local_files_only=True)
        # load_model interpolates the tower's position table to the run's resolution: count that table.
        config.vision_config.image_size = model_cfg.image_size
        config.image_seq_length = num_image_tokens(model_cfg)
        with torch.device("meta"):
            model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    elif model_cfg.arch in LLM_PRESETS:
        model = meta_model(model_cfg.arch, image_size=model_cfg.image_size, vocab_size=vocab_size,
                           image_token_id=image_token_id)
    else:
        config = llava_config(model_cfg, vocab_size=vocab_size, image_token_id=image_token_id)
        with torch.device("meta"):
            model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    # peft creates its adapter weights on the default device: keep them on meta too (seconds instead of minutes).
    with torch.device("meta"):
        return prepare_model(model, model_cfg)


def feature_map(student_hidden: int, teacher_hidden: int) -> nn.Module:
    """P as ``StudentModule`` builds it, on the meta device."""
    from kd_pipeline.losses import FeatureProjector

    with torch.device("meta"):
        return FeatureProjector(student_hidden, teacher_hidden)


def shape_of(modules: list[nn.Module], *, frozen: bool = False) -> ModelShape:
    """Counts over ``modules`` (the first one a LLaVA model or its peft wrapper); ``frozen`` ignores requires_grad.

    DeepSpeed's own ``model_to_params`` de-duplicates parameters by ``data_ptr``, which is 0 for every meta tensor,
    so the same counts are taken here by identity.
    """
    from kd_pipeline.models import unwrap_model

    seen: dict[int, nn.Parameter] = {}
    largest = 0
    for module in modules:
        for parameter in module.parameters():
            seen.setdefault(id(parameter), parameter)
        for sub in module.modules():
            largest = max(largest, sum(p.numel() for p in sub.parameters(recurse=False)))
    total = sum(p.numel() for p in seen.values())
    trainable = 0 if frozen else sum(p.numel() for p in seen.values() if p.requires_grad)
    text = unwrap_model(modules[0]).config.text_config
    return ModelShape(total=total, trainable=trainable, largest_layer=largest, hidden_size=text.hidden_size,
                      num_layers=text.num_hidden_layers, num_heads=text.num_attention_heads,
                      vocab_size=text.vocab_size)


def vocabulary(config: Config) -> tuple[int, int]:
    """(rows, ``<image>`` id) from the run's tokenizer when it is at hand, else GeoChat's 32001 / 32000."""
    from kd_pipeline.models import GEOCHAT_TEXT_VOCAB

    folder = config.data.tokenizer or config.student.path
    if folder and Path(folder).is_dir():
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

    return ZeroSettings(zero_stage(ds_config), offloaded("offload_optimizer"), offloaded("offload_param"))


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


# ----------------------------------------------------------------------------------------------------- the plan


def _nodes(world_size: int, gpus_per_node: int | None) -> tuple[int, int]:
    gpus_per_node = gpus_per_node or min(world_size, 8)
    if world_size < 1 or gpus_per_node < 1 or world_size % gpus_per_node:
        raise ConfigError(f"--world-size {world_size} is not a multiple of --gpus-per-node {gpus_per_node}")
    return gpus_per_node, world_size // gpus_per_node


def make_plan(config: Config, *, world_size: int, gpus_per_node: int | None = None) -> dict:
    """The whole plan as plain data (bytes); ``format_table`` renders it."""
    from kd_pipeline.engine.ds_config import resolve_ds_config
    from kd_pipeline.models import num_image_tokens

    gpus_per_node, num_nodes = _nodes(world_size, gpus_per_node)
    vocab_size, image_id = vocabulary(config)
    with_teacher = config.run.stage != "sft"
    student_llava = meta_llava(config.student, vocab_size=vocab_size, image_token_id=image_id)
    student_modules = [student_llava]
    teacher = None
    if with_teacher:
        teacher = shape_of([meta_llava(config.teacher, vocab_size=vocab_size, image_token_id=image_id)], frozen=True)
        student_hidden = shape_of([student_llava]).hidden_size
        student_modules.append(feature_map(student_hidden, teacher.hidden_size))
    student = shape_of(student_modules)

    student_zero = zero_settings(resolve_ds_config(config, world_size=world_size, dtype=torch.bfloat16,
                                                   hidden_size=student.hidden_size))
    states_cpu, states_gpu = trainable_states(student.trainable, student.largest_layer, student_zero,
                                              gpus_per_node=gpus_per_node, num_nodes=num_nodes)
    all_cpu, all_gpu = trainable_states(student.total, student.largest_layer, student_zero,
                                        gpus_per_node=gpus_per_node, num_nodes=num_nodes)
    frozen_cpu, frozen_gpu = frozen_params(student.total - student.trainable, student_zero, world_size=world_size,
                                           num_nodes=num_nodes)
    rows = [
        {"name": "student trainable states", "params": student.trainable, "gpu": states_gpu, "cpu": states_cpu,
         "how": f"DeepSpeed ZeRO-{student_zero.stage} estimator on the trainable count"},
        {"name": "student frozen params", "params": student.total - student.trainable, "gpu": frozen_gpu,
         "cpu": frozen_cpu, "how": "2 B/param, no grads or optimizer"},
    ]
    if teacher is not None:
        teacher_zero = zero_settings(resolve_ds_config(config, world_size=world_size, dtype=torch.bfloat16,
                                                       hidden_size=teacher.hidden_size, for_teacher=True))
        teacher_cpu, teacher_gpu = frozen_params(teacher.total, teacher_zero, world_size=world_size,
                                                 num_nodes=num_nodes)
        head_rows = vocab_size * teacher.hidden_size
        rows += [
            {"name": "teacher params (inference)", "params": teacher.total, "gpu": teacher_gpu, "cpu": teacher_cpu,
             "how": f"2 B/param / {world_size if teacher_zero.stage == 3 else 1} rank(s), no grads or optimizer"},
            {"name": "teacher LM-head copy", "params": head_rows, "gpu": PARAM_BYTES * head_rows, "cpu": 0,
             "how": "2 B x V x H_t on every rank (fused KL)"},
        ]

    seq_len = config.data.max_length + num_image_tokens(config.student) - 1
    flash = config.student.attn_implementation != "eager"
    recompute = config.student.gradient_checkpointing
    dims = dict(seq_len=seq_len, micro_batch=config.train.micro_batch_size, hidden=student.hidden_size,
                heads=student.num_heads, layers=student.num_layers)
    variants = {"eager attention": activation_bytes(**dims, flash=False, recompute=False),
                "memory-efficient attention": activation_bytes(**dims, flash=True, recompute=False),
                "gradient checkpointing": activation_bytes(**dims, flash=flash, recompute=True)}
    activations = activation_bytes(**dims, flash=flash, recompute=recompute)
    rows.append({"name": "student activations", "params": 0, "gpu": activations, "cpu": 0,
                 "how": f"Korthikanti: b={dims['micro_batch']} s={seq_len}, "
                        f"{'flash/sdpa' if flash else 'eager'}, recompute {'on' if recompute else 'off'}"})
    return {
        "world_size": world_size, "gpus_per_node": gpus_per_node, "num_nodes": num_nodes,
        "stage": config.run.stage, "student_zero": asdict(student_zero),
        "student": {**asdict(student), "arch": config.student.arch, "path": config.student.path,
                    "lora": config.student.lora},
        "teacher": None if teacher is None else {**asdict(teacher), "arch": config.teacher.arch,
                                                 "path": config.teacher.path},
        "rows": rows,
        "total": {"gpu": sum(row["gpu"] for row in rows), "cpu": sum(row["cpu"] for row in rows)},
        "deepspeed_all_trainable": {"gpu": all_gpu, "cpu": all_cpu, "params": student.total},
        "activation_variants": {**dims, **variants},
    }


def format_table(plan: dict) -> str:
    """The plan as a fixed-width table in GiB (2**30 bytes)."""
    zero = plan["student_zero"]
    offload = [name for name, on in (("optimizer", zero["offload_optimizer"]), ("params", zero["offload_param"])) if on]
    student, teacher = plan["student"], plan["teacher"]
    lines = [f"memory plan: student {student['path'] or student['arch']}{' (LoRA)' if student['lora'] else ''}"
             f" + teacher {'none' if teacher is None else teacher['path'] or teacher['arch']}, "
             f"ZeRO-{zero['stage']} (offload: {', '.join(offload) or 'none'}), {plan['world_size']} rank(s) = "
             f"{plan['num_nodes']} node(s) x {plan['gpus_per_node']}, bf16",
             f"{'component':<30}{'params':>12}{'GPU/rank GiB':>14}{'CPU/node GiB':>14}  how"]
    for row in plan["rows"]:
        params = f"{row['params'] / 1e6:,.1f}M" if row["params"] else ""
        lines.append(f"{row['name']:<30}{params:>12}{row['gpu'] / GIB:>14.2f}{row['cpu'] / GIB:>14.2f}  {row['how']}")
    lines.append(f"{'total':<30}{'':>12}{plan['total']['gpu'] / GIB:>14.2f}{plan['total']['cpu'] / GIB:>14.2f}"
                 "  model states + activations (no CUDA context, fragmentation or buffers)")
    reference = plan["deepspeed_all_trainable"]
    lines.append(f"reference: DeepSpeed's estimator with all {reference['params'] / 1e6:,.1f}M student params "
                 f"trainable: {reference['gpu'] / GIB:.2f} GiB GPU/rank, {reference['cpu'] / GIB:.2f} GiB CPU/node")
    variants = plan["activation_variants"]
    lines.append("activations by setting: " + ", ".join(
        f"{name} {variants[name] / GIB:.2f} GiB"
        for name in ("eager attention", "memory-efficient attention", "gradient checkpointing")))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kd_pipeline.plan",
                                     description="Per-rank memory plan (model states and activations) of a run.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=help_text())
    parser.add_argument("--config", help="run YAML; omitted keys keep their defaults")
    parser.add_argument("--world-size", type=int, default=1, help="ranks (GPUs) in the run")
    parser.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node (default: min(world, 8))")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON (bytes) instead of a table")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides applied after the YAML")
    return parser.parse_intermixed_args(argv)  # overrides may come before or after the options


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = load_config(args.config, args.overrides)
    plan = make_plan(config, world_size=args.world_size, gpus_per_node=args.gpus_per_node)
    print(json.dumps(plan, indent=2) if args.json else format_table(plan))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
