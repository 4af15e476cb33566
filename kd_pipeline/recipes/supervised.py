"""The supervised recipes: ``run.stage=sft`` (student only, ground truth) and ``run.stage=kd_sft`` (stage 1 of the
paper: word-level KD + projector-feature alignment, best-validation checkpoint kept).

The loop lives here and only here. One optimizer step = ``train.grad_accum`` micro-batches; for each, the teacher
runs first (no grad; every rank runs the same number of teacher forwards because every rank runs the same number of
micro-batches), then the student forward computes the loss terms inside the module (see engine/modules.py).

Resume order matters for exactness: the loader (and its worker seeds) is built before the RNG states are restored,
so building it never consumes random numbers the uninterrupted run would have used for training.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from kd_pipeline import checkpoint as ckpt
from kd_pipeline.config import Config
from kd_pipeline.data import build_eval_loader, build_train_loader, load_loader_state
from kd_pipeline.engine.build import Engines, build_engines
from kd_pipeline.engine.ds_config import zero_stage
from kd_pipeline.engine.modules import LossSettings, run_teacher
from kd_pipeline.engine.metrics import reduce_mean, reduce_sum
from kd_pipeline.engine.stopping import RESUME_EXIT_CODE, install_failure_report
from kd_pipeline.recipes.common import (start_outputs, load_resume, prepare_resume, save, supervised_count, to_device,
                                        write_partition_report)
from kd_pipeline.runtime import Runtime, restore_rng_state, seed_everything

log = logging.getLogger(__name__)


def stage1_settings(config: Config) -> LossSettings:
    return LossSettings(alpha_kd=config.kd.alpha_kd, temperature=config.kd.temperature,
                        align_weight=config.kd.align_weight, fused=config.kd.fused, chunk_size=config.kd.chunk_size or None)


def loss_terms(engines: Engines, batch: dict, config: Config) -> dict[str, torch.Tensor]:
    """Teacher forward (if any) then the student's loss terms for one micro-batch."""
    teacher = run_teacher(engines.teacher, batch) if engines.teacher is not None else None
    return engines.student(mode="supervised", batch=batch, teacher=teacher, settings=stage1_settings(config))


@torch.no_grad()
def evaluate(engines: Engines, config: Config, runtime: Runtime, eval_loader) -> dict[str, float]:
    """Token-weighted mean of every loss term over the val split, exactly once across ranks."""
    engines.student.eval()
    sums: dict[str, float] = {}
    tokens = 0
    for batch in eval_loader:  # the same number of batches on every rank (padding batches count 0 tokens)
        batch = to_device(batch, runtime.device, runtime.dtype)
        count = supervised_count(batch)
        terms = loss_terms(engines, batch, config)
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + float(value) * count
        tokens += count
    engines.student.train()
    totals = reduce_sum({**sums, "_tokens": float(tokens)}, runtime.world_size)
    denominator = max(totals.pop("_tokens"), 1.0)
    return {f"val_{name}": value / denominator for name, value in totals.items()}


def run(config: Config, runtime: Runtime) -> int:
    output_dir = Path(config.run.output_dir)
    resume = prepare_resume(config, runtime)  # before the engines: their DeepSpeed config follows its choice
    config = resume.config
    seed_everything(config.run.seed)  # identical model initialisation on every rank
    engines = build_engines(config, runtime)
    resume_folder = resume.folder
    state = ckpt.TrainerState(world_size=runtime.world_size, zero_stage=zero_stage(engines.student_ds_config),
                              stage=config.run.stage)
    rank_state = None
    if resume_folder is not None:
        state, rank_state = load_resume(engines, resume, runtime)
        log.info("resumed from %s at step %d", resume.engine_folder, state.step)
    install_failure_report(runtime.rank, state)

    loader_kwargs = dict(tokenizer=engines.tokenizer, image_size=config.student.image_size,
                         num_image_tokens=engines.num_image_tokens, micro_batch_size=config.train.micro_batch_size,
                         rank=runtime.rank, world_size=runtime.world_size)
    train_loader = build_train_loader(config.data, seed=config.run.seed, split="train",
                                      state=load_loader_state(resume_folder, "train") if resume_folder else None,
                                      **loader_kwargs)
    eval_loader = build_eval_loader(config.data, split="val", max_batches=config.train.eval_batches,
                                    **loader_kwargs) if config.train.eval_every else None  # 0: no validation
    batches = iter(train_loader)
    if rank_state is not None:
        restore_rng_state(rank_state["rng"])
    else:
        seed_everything(config.run.seed + runtime.rank)

    config_yaml, metrics, stopper = start_outputs(config, runtime, state.step)
    exit_code = 0
    engines.student.train()
    for step in range(state.step + 1, config.train.max_steps + 1):
        step_start = time.perf_counter()
        data_wait, tokens = 0.0, 0
        step_terms: dict[str, float] = {}
        for _ in range(config.train.grad_accum):
            fetch_start = time.perf_counter()
            batch = to_device(next(batches), runtime.device, runtime.dtype)
            data_wait += time.perf_counter() - fetch_start
            tokens += int(batch["attention_mask"].sum())
            terms = loss_terms(engines, batch, config)
            engines.student.backward(terms["loss"])
            engines.student.step()
            for name, value in terms.items():
                step_terms[name] = step_terms.get(name, 0.0) + float(value) / config.train.grad_accum
        state.step = step
        elapsed = time.perf_counter() - step_start
        record = reduce_mean(step_terms, runtime.world_size)
        totals = reduce_sum({"tokens": float(tokens)}, runtime.world_size)
        record.update(lr=float(engines.scheduler.get_last_lr()[0]), tokens_per_s=totals["tokens"] / elapsed,
                      data_wait_frac=data_wait / elapsed)

        is_best = False
        if config.train.eval_every and (step % config.train.eval_every == 0 or step == config.train.max_steps):
            record.update(evaluate(engines, config, runtime, eval_loader))
            if state.best_val_loss is None or record["val_loss"] < state.best_val_loss:
                state.best_val_loss, state.best_tag, is_best = record["val_loss"], ckpt.tag_for_step(step), True
        if step % config.run.log_every == 0 or "val_loss" in record or step == config.train.max_steps:
            metrics.log(step, record)
        metrics.progress(step, {k: v for k, v in record.items() if k in ("loss", "ce", "kd", "align", "val_loss",
                                                                        "tokens_per_s", "data_wait_frac")})
        # The step limit is the same on every rank (config), so it needs no agreement; signals do.
        stop = stopper.should_stop() or (config.run.stop_at_step > 0 and step >= config.run.stop_at_step)
        if (step % config.checkpoint.every_steps == 0 or step == config.train.max_steps or stop or is_best):
            save(engines, config, runtime, state, config_yaml, loaders={"train": train_loader})
        if stop:
            exit_code = RESUME_EXIT_CODE
            break
    metrics.close()
    write_partition_report(engines, output_dir, runtime.rank)
    return exit_code
