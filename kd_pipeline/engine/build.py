"""Build the tokenizer, the student engine (ZeRO-3, AdamW, cosine schedule) and the frozen teacher engine.

Order matters and is fixed here (torchtune style, one line of why each):
1. tokenizer first: the models need its size and the ``<image>`` id;
2. the teacher's DeepSpeed config next, then the teacher under ``zero.Init`` so it is partitioned while it loads
   (a 13B replica per rank is what runs MiniLLM out of memory), wrapped by a second ``deepspeed.initialize`` with no
   optimizer, in eval mode; its LM head gathered once for the fused loss;
3. the student under ``zero.Init`` last, since P's shape needs the teacher's hidden size; its optimizer sees only
   trainable parameters (LoRA or LLM, projector by config, P).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from transformers import PreTrainedTokenizerBase
from transformers.integrations import HfDeepSpeedConfig

from kd_pipeline.config import Config, ConfigError, ModelConfig
from kd_pipeline.engine.ds_config import resolve_ds_config, zero_stage
from kd_pipeline.engine.modules import StudentModule, TeacherModule, TeacherOutputs, run_teacher

if TYPE_CHECKING:  # deepspeed is imported when engines are built, not when this module is
    from deepspeed import DeepSpeedEngine
from kd_pipeline.runtime import Runtime
from kd_pipeline.tokenizer import image_token_id, load_tokenizer, tokenizer_folder

log = logging.getLogger(__name__)


@dataclass
class Engines:
    """What ``build_engines`` made. Recipes use the named accessors below, not the engines' insides."""
    tokenizer: PreTrainedTokenizerBase
    student: DeepSpeedEngine           # around StudentModule: forward(mode=...), backward, step, checkpoints
    optimizer: torch.optim.Optimizer   # DeepSpeed's ZeRO optimizer around AdamW
    scheduler: LRScheduler             # warm-up + cosine, stepped by the student engine
    teacher: DeepSpeedEngine | None    # around TeacherModule (None for run.stage=sft)
    student_ds_config: dict
    image_token_id: int
    num_image_tokens: int
    vocab_size: int

    @property
    def student_llava(self) -> nn.Module:
        """The student's LLaVA (peft-wrapped with LoRA), called directly for decoding and validation forwards."""
        return self.student.module.llava

    @property
    def teacher_llava(self) -> nn.Module:
        return self._teacher_module().llava

    @property
    def student_head(self) -> torch.Tensor:
        """The student's LM-head weight (V, Hs); a ZeRO-3 partition outside a gather."""
        return self.student.module.head_weight

    @property
    def teacher_head(self) -> torch.Tensor:
        """The teacher's LM head (V, Ht), gathered once at build time, padding rows dropped."""
        return self._teacher_module().head_weight

    @property
    def zero_stage(self) -> int:
        return zero_stage(self.student_ds_config)

    def learning_rate(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def teacher_outputs(self, batch: dict) -> TeacherOutputs:
        """A teacher forward (collective under ZeRO-3: every rank must run as many as the others)."""
        if self.teacher is None:
            raise ConfigError("this run has no teacher (run.stage=sft)")
        return run_teacher(self.teacher, batch)

    def partition_report(self) -> dict:
        """This rank's share of each engine's parameters (and the teacher's forward count): engine_rank{r}.json."""
        report = {"student": partition_report(self.student)}
        if self.teacher is not None:
            report["teacher"] = {**partition_report(self.teacher),
                                 "forward_count": self._teacher_module().forward_count}
        return report

    def _teacher_module(self) -> TeacherModule:
        if self.teacher is None:
            raise ConfigError("this run has no teacher (run.stage=sft)")
        return self.teacher.module


def _hidden_size(model_cfg: ModelConfig) -> int:
    if model_cfg.path:
        import json

        config_file = Path(model_cfg.path) / "config.json"
        if not config_file.is_file():
            raise ConfigError(f"{model_cfg.path} has no config.json: not a transformers model folder")
        return int(json.loads(config_file.read_text())["text_config"]["hidden_size"])
    from kd_pipeline.models import llm_hidden_size

    return llm_hidden_size(model_cfg)


def _build_llava(model_cfg: ModelConfig, ds_config: dict, runtime: Runtime, *, vocab_size: int, image_id: int,
                 frozen: bool):
    """Construct (or load) a LLaVA model, partitioned at construction when ZeRO-3 is on.

    While an ``HfDeepSpeedConfig`` is alive, transformers' ``from_pretrained`` and ``_from_config`` enter
    ``deepspeed.zero.Init`` themselves (with this config), so no second context is opened here.
    """
    from kd_pipeline.models import create_model

    hf_ds_config = HfDeepSpeedConfig(ds_config) if zero_stage(ds_config) == 3 else None
    model = create_model(model_cfg, vocab_size=vocab_size, image_token_id=image_id, dtype=runtime.dtype, frozen=frozen)
    del hf_ds_config
    return model


def build_engines(config: Config, runtime: Runtime, init_weights: Path | None = None) -> Engines:
    """``init_weights``: a checkpoint folder whose module weights the student starts from (stage 2's init_from)."""
    import deepspeed
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    from kd_pipeline.models import num_image_tokens

    tokenizer = load_tokenizer(tokenizer_folder(config))
    vocab_size, image_id = len(tokenizer), image_token_id(tokenizer)
    student_tokens = num_image_tokens(config.student)
    teacher_engine = None
    teacher_hidden = None
    if config.run.stage != "sft":
        if num_image_tokens(config.teacher) != student_tokens:
            raise ConfigError(f"teacher and student see different image token counts ({num_image_tokens(config.teacher)}"
                              f" vs {student_tokens}): give both the same image_size and patch_size")
        teacher_hidden = _hidden_size(config.teacher)
        teacher_ds = resolve_ds_config(config, world_size=runtime.world_size, dtype=runtime.dtype,
                                       hidden_size=teacher_hidden, for_teacher=True)
        teacher_llava = _build_llava(config.teacher, teacher_ds, runtime, vocab_size=vocab_size, image_id=image_id,
                                     frozen=True)
        _check_same_tokenizer(config, teacher_llava, vocab_size)
        teacher_engine, *_ = deepspeed.initialize(model=TeacherModule(teacher_llava), config=teacher_ds)
        teacher_engine.eval()
        teacher_engine.module.gather_head(vocab_size)

    student_ds = resolve_ds_config(config, world_size=runtime.world_size, dtype=runtime.dtype,
                                   hidden_size=_hidden_size(config.student))
    student_llava = _build_llava(config.student, student_ds, runtime, vocab_size=vocab_size, image_id=image_id,
                                 frozen=False)
    student_module = StudentModule(student_llava, teacher_hidden)
    if init_weights is not None:
        from kd_pipeline.checkpoint import load_module_weights

        load_module_weights(student_module, init_weights)  # before the optimizer takes its fp32 master copies
    trainable = [p for p in student_module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.train.lr, betas=config.train.adam_betas,
                                  weight_decay=config.train.weight_decay)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=config.train.warmup_steps, num_training_steps=config.train.max_steps,
        min_lr_rate=config.train.min_lr_ratio)
    student_engine, optimizer, _, scheduler = deepspeed.initialize(
        model=student_module, optimizer=optimizer, lr_scheduler=scheduler, config=student_ds)
    log.info("student: %d trainable tensors; teacher: %s; ZeRO stage %d on %d rank(s), %s",
             len(trainable), "none" if teacher_engine is None else "frozen", zero_stage(student_ds),
             runtime.world_size, runtime.dtype)
    return Engines(tokenizer=tokenizer, student=student_engine, optimizer=optimizer, scheduler=scheduler,
                   teacher=teacher_engine, student_ds_config=student_ds, image_token_id=image_id,
                   num_image_tokens=student_tokens, vocab_size=vocab_size)


def partition_report(engine) -> dict:
    """This rank's share of a ZeRO-3 engine's parameters, and whether any carry gradients or optimizer state."""
    params = list(engine.module.parameters())
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    full = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params)
    # A ZeRO-3 engine without an optimizer still holds a parameter-offload manager in `.optimizer`; optimizer
    # *state* lives in the wrapped torch optimizer of a real ZeRO optimizer.
    inner = getattr(getattr(engine, "optimizer", None), "optimizer", None)
    state_numel = sum(value.numel() for per_param in getattr(inner, "state", {}).values()
                      for value in per_param.values() if isinstance(value, torch.Tensor))
    return {"local_numel": int(local), "full_numel": int(full), "trainable_tensors": sum(p.requires_grad for p in params),
            "tensors_with_grad": sum(p.grad is not None for p in params), "optimizer_state_numel": int(state_numel)}


def _check_same_tokenizer(config: Config, teacher_llava, vocab_size: int) -> None:
    """Teacher rows beyond the student's vocabulary are padding (truncated later); a smaller teacher vocabulary is a
    different tokenizer and refused. (A teacher folder whose own tokenizer differs is refused earlier, before any
    model is built: ``kd_pipeline.preflight``.)"""
    from kd_pipeline.models.layout import unwrap_model

    teacher_rows = unwrap_model(teacher_llava).config.text_config.vocab_size
    if teacher_rows < vocab_size:
        raise ConfigError(f"teacher vocabulary ({teacher_rows} rows) is smaller than the tokenizer's {vocab_size}: "
                          f"teacher and student must share one tokenizer")
