"""The supervised recipes: ``run.stage=sft`` (student only, ground truth) and ``run.stage=kd_sft`` (stage 1 of the
paper, Table 1's first line: word-level KD with the ground truth, best-validation checkpoint kept; the projector
alignment is off by default, ``kd.align_weight`` > 0 adds it as an ablation).

The loop lives here and only here. One optimizer step = ``train.grad_accum`` micro-batches, fetched first: the
step's global count N of supervised tokens (all micro-batches, all ranks; one all-reduce) divides every token sum,
so the step's gradient is the exact mean over its tokens however they fall into micro-batches and ranks (as
torchtune normalises; the alignment term stays a per-micro-batch mean over image tokens). DeepSpeed divides each
micro-batch's loss by ``grad_accum`` and averages gradients over ranks, so the loss is given N / (grad_accum x
world size) as its denominator. For each micro-batch the teacher runs first (no grad; every rank runs the same
number of teacher forwards because every rank runs the same number of micro-batches), then the student forward
computes the loss terms inside the module (see engine/modules.py).

Resume order matters for exactness: the loader (and its worker seeds) is built before the RNG states are restored,
so building it never consumes random numbers the uninterrupted run would have used for training.
"""

from __future__ import annotations

import torch

from kd_pipeline.config import Config
from kd_pipeline.data import build_eval_loader, build_train_loader
from kd_pipeline.engine.build import Engines
from kd_pipeline.engine.metrics import CONTRIBUTION_PREFIX, reduce_mean, reduce_sum
from kd_pipeline.engine.modules import LossSettings
from kd_pipeline.prompts import IGNORE_INDEX
from kd_pipeline.recipes.common import StepClock, StepEnd, detached, open_session, to_device
from kd_pipeline.runtime import Runtime


def stage1_settings(config: Config) -> LossSettings:
    return LossSettings(alpha_kd=config.kd.alpha_kd, temperature=config.kd.temperature,
                        align_weight=config.kd.align_weight, fused=config.kd.fused,
                        chunk_size=config.kd.chunk_size or None)


def supervised_count(batch: dict) -> int:
    """Supervised tokens of a batch (labels shifted by one, as the loss sees them)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def token_denominator(micro_batches: list[dict], world_size: int) -> float:
    """The denominator each micro-batch's token sums get: the step's global supervised-token count divided by the
    micro-batches per rank and the ranks, whose averaging (DeepSpeed's) multiplies it back. Collective."""
    local = float(sum(supervised_count(batch) for batch in micro_batches))
    total = reduce_sum({"tokens": local})["tokens"]
    return max(total, 1.0) / (len(micro_batches) * world_size)


def loss_terms(engines: Engines, batch: dict, config: Config,
               token_count: float | None = None) -> dict[str, torch.Tensor]:
    """Teacher forward (if any) then the student's loss terms for one micro-batch."""
    teacher = engines.teacher_outputs(batch) if engines.teacher is not None else None
    return engines.student(mode="supervised", batch=batch, teacher=teacher, settings=stage1_settings(config),
                           token_count=token_count)


def train_step(engines: Engines, config: Config, runtime: Runtime, batches) -> dict[str, float]:
    """One optimizer step over ``train.grad_accum`` micro-batches; returns its record (terms, lr, throughput)."""
    clock = StepClock(runtime.world_size)
    micro_batches = [clock.next(batches) for _ in range(config.train.grad_accum)]
    denominator = token_denominator(micro_batches, runtime.world_size)
    sums: dict[str, float] = {}
    for batch in micro_batches:
        batch = to_device(batch, runtime.device, runtime.dtype)
        clock.count(batch)
        terms = loss_terms(engines, batch, config, token_count=denominator)
        engines.student.backward(terms["loss"])
        engines.student.step()
        for name, value in detached(terms).items():
            sums[name] = sums.get(name, 0.0) + value / config.train.grad_accum
    # Each micro-batch's term is its token sum / (N / (A x W)): the mean over micro-batches and ranks is sum / N.
    record = reduce_mean(sums, runtime.world_size)
    record.update(lr=engines.learning_rate(), **clock.record())
    return record


@torch.no_grad()
def evaluate(engines: Engines, config: Config, runtime: Runtime, eval_loader) -> dict[str, float]:
    """Token-weighted mean of every loss term over the val split, exactly once across ranks."""
    engines.student.eval()
    sums: dict[str, float] = {}
    tokens = 0
    for batch in eval_loader:  # the same number of batches on every rank (padding batches count 0 tokens)
        batch = to_device(batch, runtime.device, runtime.dtype)
        count = supervised_count(batch)
        for name, value in detached(loss_terms(engines, batch, config)).items():
            if not name.startswith(CONTRIBUTION_PREFIX):  # validation reports the terms; their weights are known
                sums[name] = sums.get(name, 0.0) + value * count
        tokens += count
    engines.student.train()
    totals = reduce_sum({**sums, "_tokens": float(tokens)})
    denominator = max(totals.pop("_tokens"), 1.0)
    return {f"val_{name}": value / denominator for name, value in totals.items()}


def run(config: Config, runtime: Runtime) -> int:
    session = open_session(config, runtime)
    config, engines = session.config, session.engines
    loader_kwargs = dict(tokenizer=engines.tokenizer, image_size=config.student.image_size,
                         num_image_tokens=engines.num_image_tokens, micro_batch_size=config.train.micro_batch_size,
                         rank=runtime.rank, world_size=runtime.world_size)
    train_loader = build_train_loader(config.data, seed=config.run.seed, split="train",
                                      state=session.loader_state("train"), **loader_kwargs)
    eval_loader = build_eval_loader(config.data, split="val", max_batches=config.train.eval_batches,
                                    **loader_kwargs) if config.train.eval_every else None  # 0: no validation
    session.restore_rng()
    end_of_step = StepEnd(session, validate=lambda: evaluate(engines, config, runtime, eval_loader),
                          save=lambda: session.save(loaders={"train": train_loader}))
    batches = iter(train_loader)
    engines.student.train()
    stopped = False
    for step in range(session.state.step + 1, config.train.max_steps + 1):
        with session.watchdog.step():
            record = train_step(engines, config, runtime, batches)
            session.state.step = step
            stopped = end_of_step(record)
        if stopped:
            break
    return session.close(stopped)
