"""Stage 2 (``run.stage=minillm``): reverse-KL policy-gradient distillation (paper eq. 6-10, MiniLLM's code).

One round:
1. Rollouts: ``minillm.rollouts_per_rank`` prompts per rank are answered by sampling from the teacher-mixed
   distribution alpha*p + (1-alpha)*q (kd_pipeline/sampling). With ``minillm.gather_params`` both models' ZeRO-3
   parameters are gathered once for the whole phase (MiniLLM reports ~10x faster than per-token gathers); otherwise
   generation runs partitioned and every rank runs the same number of decode steps (``sync_ranks``).
2. Scoring, once per round: the teacher runs on prompt+response (its hidden states at the response positions are
   cached for the single-step term), rewards r_t = log p - log q, importance weights (per-step q/p~ or the product),
   and long-term advantages (MiniLLM: discounted return / remaining tokens, whitened across ranks; or the paper's
   R_{t+1}/(T-t-1) with gamma 1).
3. ``minillm.ppo_epochs`` passes over the buffer in a seeded order; each micro-batch adds, in ONE student forward,
   the PPO-clipped long-term term, the full-vocabulary reverse KL (single-step term, fused kernel), the pre-training
   loss on a D_PT batch ((1-kd_ratio)*LM + kd_ratio*forward KD) and the alignment term.

Batch arithmetic: a round is ``rollouts_per_rank / train.micro_batch_size`` micro-batches x ``ppo_epochs``; an
optimizer step is ``train.grad_accum`` micro-batches, i.e. ``micro_batch_size x grad_accum x world size`` sequences,
and it may end mid-round or span rounds (the next buffer is then collected between two micro-batches of the step),
so MiniLLM's ratios (>= 64 sequences per step, 4 PPO epochs) are expressible on one or two ranks. The student has no
dropout here: ``student.lora_dropout`` must be 0 (Config refuses otherwise), since dropout would make the PPO ratio
of new to old log-probabilities differ from 1 even before any update.

Resume is exact mid-round: a checkpoint taken anywhere stores, per rank, the rollout buffer of the current round, the
position in it, the sampler's generator state, the RNG states and both loaders' states; a resumed run continues the
same round with the same buffer and reproduces the uninterrupted loss sequence.

Telemetry: every training line has the loss terms averaged over the step's micro-batches and ranks; ``rev_kl`` (the
exact per-position reverse KL of the current student, averaged over the step's response TOKENS on all ranks) and
``clip_frac`` (share of those tokens where PPO's clip is active); and the latest round's statistics over all ranks:
``reward`` (log p - log q per token), ``w_mean`` (token-weighted mean importance weight), ``w_max`` (all-reduce MAX)
and ``len_mixed`` (mean rollout length).

Validation (every ``train.eval_every`` steps) samples student-only answers (alpha = 0) to held-out prompts with a
fixed seed and reports ``val_loss`` = the exact per-position reverse KL KL[q||p] averaged over answer TOKENS (length
normalised; it selects ``best``), ``val_rev_kl_seq`` = the same summed per answer and averaged
over answers (by the chain rule an unbiased, Rao-Blackwellised estimate of the sequence-level KL[q||p]), and
``val_len_student`` (mean answer length). Per token, a long answer cannot win or lose ``best`` by its length alone.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import torch

from kd_pipeline import checkpoint as ckpt
from kd_pipeline.config import Config
from kd_pipeline.data import build_eval_prompt_loader, build_prompt_loader, build_pt_loader, load_loader_state
from kd_pipeline.engine.build import Engines, build_engines
from kd_pipeline.engine.ds_config import zero_stage
from kd_pipeline.engine.metrics import reduce_max, reduce_mean, reduce_sum
from kd_pipeline.engine.modules import (LossSettings, PolicySettings, TeacherOutputs, llava_hidden_and_features,
                                        run_teacher)
from kd_pipeline.engine.stopping import RESUME_EXIT_CODE, install_failure_report
from kd_pipeline.losses import fused_token_kl
from kd_pipeline.losses.minillm import importance_weights, long_term_advantages, token_rewards, whiten
from kd_pipeline.recipes.common import (load_resume, prepare_resume, save, start_outputs, to_device,
                                        write_partition_report)
from kd_pipeline.runtime import Runtime, restore_rng_state, seed_everything
from kd_pipeline.sampling import gathered_for_decoding, sample_mixed

log = logging.getLogger(__name__)

BUFFER_KEYS = ("input_ids", "attention_mask", "position_ids", "pixel_values", "response_tokens", "response_mask",
               "old_logprob", "advantages", "weights", "teacher_hidden", "teacher_features")


def _gathered(engines: Engines, enabled: bool):
    """Both models' ZeRO-3 parameters gathered once for a whole rollout phase (re-partitioned on exit)."""
    return gathered_for_decoding(engines.student, engines.teacher) if enabled else contextlib.nullcontext()


def _sequences(prompts: dict, tokens: torch.Tensor, mask: torch.Tensor) -> dict:
    """Prompt (left-padded, (B, P)) + response ((B, T)) as one batch with positions counted over real tokens."""
    input_ids = torch.cat([prompts["input_ids"], tokens], dim=1)  # (B, P+T)
    attention_mask = torch.cat([prompts["attention_mask"], mask.to(prompts["attention_mask"].dtype)], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, P+T)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    if prompts.get("pixel_values") is not None and prompts["pixel_values"].shape[0] > 0:
        batch["pixel_values"] = prompts["pixel_values"]
    return batch


def _sample(engines: Engines, config: Config, runtime: Runtime, prompts: dict, generator: torch.Generator,
            mix_alpha: float):
    pixel_values = prompts.get("pixel_values")
    return sample_mixed(
        engines.student.module.llava, engines.teacher.module.llava, prompts["input_ids"], prompts["attention_mask"],
        pixel_values if pixel_values is not None and pixel_values.shape[0] > 0 else None,
        mix_alpha=mix_alpha, max_new_tokens=config.minillm.max_new_tokens,
        eos_token_id=engines.tokenizer.eos_token_id, pad_token_id=engines.tokenizer.pad_token_id,
        temperature=config.minillm.temperature, top_k=config.minillm.top_k, top_p=config.minillm.top_p,
        generator=generator, sync_ranks=runtime.world_size > 1, banned_token_ids=(engines.image_token_id,))


@torch.no_grad()
def collect_rollouts(engines: Engines, config: Config, runtime: Runtime, prompt_batches, generator) -> tuple:
    """One round's buffer (list of micro-batches, tensors on the compute device) and its statistics."""
    settings = config.minillm
    count = settings.rollouts_per_rank // config.train.micro_batch_size
    engines.student.eval()
    prompts_list, rollouts = [], []
    with _gathered(engines, settings.gather_params):
        for _ in range(count):
            prompts = to_device(next(prompt_batches), runtime.device, runtime.dtype)
            rollouts.append(_sample(engines, config, runtime, prompts, generator, settings.mix_alpha))
            prompts_list.append(prompts)
    engines.student.train()
    buffer, raw_rewards, weights_all, lengths = [], [], [], []
    for prompts, rollout in zip(prompts_list, rollouts):
        batch = _sequences(prompts, rollout.tokens, rollout.mask)
        teacher = run_teacher(engines.teacher, batch)  # collective under ZeRO-3: same count on every rank
        length = rollout.tokens.shape[1]
        rewards = token_rewards(rollout.teacher_logprob, rollout.student_logprob, rollout.mask,
                                reward_scaling=settings.reward_scaling, reward_clip=settings.reward_clip)
        weights = importance_weights(rollout.student_logprob, rollout.mixed_logprob, rollout.mask,
                                     mode=settings.weights, clip=settings.weight_clip or None)
        gamma = settings.gamma if settings.long_term == "minillm" else 1.0
        advantages = long_term_advantages(rewards, rollout.mask, variant=settings.long_term, gamma=gamma)
        buffer.append({**batch, "response_tokens": rollout.tokens, "response_mask": rollout.mask,
                       "old_logprob": rollout.student_logprob, "advantages": advantages, "weights": weights,
                       "teacher_hidden": teacher.hidden[:, -length - 1:-1].contiguous(),  # (B, T, Ht)
                       "teacher_features": teacher.features})
        valid = rollout.mask.bool()
        raw_rewards.append((rollout.teacher_logprob - rollout.student_logprob)[valid])
        weights_all.append(weights[valid])
        lengths.append(rollout.lengths.float())
    if settings.long_term == "minillm":  # whiten over every valid token of the round, on all ranks
        flat = torch.cat([entry["advantages"][entry["response_mask"].bool()] for entry in buffer])
        flat = whiten(flat[None], torch.ones_like(flat, dtype=torch.bool)[None], distributed=True)[0]
        offset = 0
        for entry in buffer:
            valid = entry["response_mask"].bool()
            entry["advantages"] = torch.zeros_like(entry["advantages"]).masked_scatter(
                valid, flat[offset:offset + int(valid.sum())])
            offset += int(valid.sum())
    stats = round_statistics(torch.cat(raw_rewards), torch.cat(weights_all), torch.cat(lengths), runtime.world_size)
    return buffer, stats


def round_statistics(raw_rewards: torch.Tensor, weights: torch.Tensor, lengths: torch.Tensor,
                     world_size: int) -> dict[str, float]:
    """The round's rollout statistics over ALL ranks (collective): ``reward`` (log p - log q) and ``w_mean`` are
    token-weighted means over every valid response token, ``w_max`` the largest importance weight on any rank (an
    all-reduce MAX), ``len_mixed`` the mean response length. ``raw_rewards`` and ``weights``: (N_tokens,) this
    rank's valid tokens; ``lengths``: (N_rollouts,)."""
    totals = reduce_sum({"reward_sum": float(raw_rewards.sum()), "weight_sum": float(weights.sum()),
                         "tokens": float(weights.numel()), "length_sum": float(lengths.sum()),
                         "rollouts": float(lengths.numel())}, world_size)
    # Weights are positive, so 0 is a neutral element of the MAX for a rank without valid tokens.
    w_max = reduce_max({"w_max": float(weights.max()) if weights.numel() else 0.0}, world_size)["w_max"]
    tokens = max(totals["tokens"], 1.0)
    return {"reward": totals["reward_sum"] / tokens, "w_mean": totals["weight_sum"] / tokens, "w_max": w_max,
            "len_mixed": totals["length_sum"] / max(totals["rollouts"], 1.0)}


def _micro_order(config: Config, round_index: int, epoch: int, count: int) -> list[int]:
    """The order of the buffer's micro-batches in one PPO epoch: seeded, so a resumed run needs no state for it."""
    generator = torch.Generator().manual_seed(config.run.seed * 1_000_003 + round_index * 1009 + epoch)
    return torch.randperm(count, generator=generator).tolist()


def _policy_step(engines: Engines, config: Config, entry: dict, pt_batch: dict | None) -> dict:
    settings = config.minillm
    rollout_teacher = TeacherOutputs(entry["teacher_hidden"], entry["teacher_features"],
                                     engines.teacher.module.head_weight)
    pt_teacher = run_teacher(engines.teacher, pt_batch) if pt_batch is not None else None
    return engines.student(
        mode="minillm", rollout=entry, rollout_teacher=rollout_teacher, pt_batch=pt_batch, pt_teacher=pt_teacher,
        policy=PolicySettings(clip_eps=settings.clip_eps, single_step_weight=settings.single_step_weight,
                              align_weight=config.kd.align_weight, chunk_size=config.kd.chunk_size or None),
        pt_settings=LossSettings(alpha_kd=settings.kd_ratio, temperature=1.0, align_weight=0.0, fused=config.kd.fused,
                                 chunk_size=config.kd.chunk_size or None),
        pt_weight=settings.pt_weight)


@torch.no_grad()
def evaluate(engines: Engines, config: Config, runtime: Runtime, val_prompts) -> dict[str, float]:
    """Student-only answers to the same held-out prompts each time (fixed seed): the exact per-position reverse KL
    averaged over answer tokens (``val_loss``), the same summed per answer and averaged over answers
    (``val_rev_kl_seq``), and the mean answer length (``val_len_student``)."""
    import deepspeed

    generator = torch.Generator(device=runtime.device).manual_seed(config.run.seed + 7919 * (runtime.rank + 1))
    totals = {"kl_sum": 0.0, "tokens": 0.0, "answers": 0.0}
    head = engines.student.module.head_weight
    for prompts in val_prompts:
        is_padding = bool(prompts.pop("is_padding", False))
        prompts = to_device(prompts, runtime.device, runtime.dtype)
        engines.student.eval()
        with _gathered(engines, config.minillm.gather_params):
            rollout = _sample(engines, config, runtime, prompts, generator, mix_alpha=0.0)
        batch = _sequences(prompts, rollout.tokens, rollout.mask)
        length = rollout.tokens.shape[1]
        student_hidden, _ = llava_hidden_and_features(engines.student.module.llava, batch)
        teacher = run_teacher(engines.teacher, batch)
        with deepspeed.zero.GatheredParameters([head], enabled=hasattr(head, "ds_id")):
            kl = fused_token_kl(student_hidden[:, -length - 1:-1], head, teacher.hidden[:, -length - 1:-1],
                                teacher.head_weight, direction="reverse", mask=rollout.mask.bool(),
                                chunk_size=config.kd.chunk_size or None).kl  # (B, T)
        if is_padding:  # ran only to keep the collective generation and forward counts equal across ranks
            continue
        totals["kl_sum"] += float(kl.sum())
        totals["tokens"] += float(rollout.mask.sum())
        totals["answers"] += float(rollout.tokens.shape[0])
    engines.student.train()
    totals = reduce_sum(totals, runtime.world_size)
    answers = max(totals["answers"], 1.0)
    return {"val_loss": totals["kl_sum"] / max(totals["tokens"], 1.0), "val_rev_kl_seq": totals["kl_sum"] / answers,
            "val_len_student": totals["tokens"] / answers}


def run(config: Config, runtime: Runtime) -> int:
    settings = config.minillm
    micro_per_round = settings.rollouts_per_rank // config.train.micro_batch_size  # checked by Config
    output_dir = Path(config.run.output_dir)
    resume = prepare_resume(config, runtime)  # before the engines: their DeepSpeed config follows its choice
    config = resume.config
    resume_folder = resume.folder
    seed_everything(config.run.seed)
    init_weights = ckpt.resolve_init_from(config.run.init_from) if config.run.init_from and not resume_folder else None
    engines = build_engines(config, runtime, init_weights=init_weights)
    state = ckpt.TrainerState(world_size=runtime.world_size, zero_stage=zero_stage(engines.student_ds_config),
                              stage=config.run.stage, extra={"round": 0})
    rank_state = None
    if resume_folder is not None:
        # After a change of rank count rank_state is None: the sampler's generator and the round restart.
        state, rank_state = load_resume(engines, resume, runtime)
        log.info("resumed stage 2 from %s at step %d", resume.engine_folder, state.step)
    install_failure_report(runtime.rank, state)

    loader_kwargs = dict(tokenizer=engines.tokenizer, image_size=config.student.image_size,
                         num_image_tokens=engines.num_image_tokens, micro_batch_size=config.train.micro_batch_size,
                         rank=runtime.rank, world_size=runtime.world_size, seed=config.run.seed)
    prompt_loader = build_prompt_loader(config.data, split="train", **loader_kwargs,
                                        state=load_loader_state(resume_folder, "prompt") if resume_folder else None)
    pt_loader = build_pt_loader(config.data, **loader_kwargs,
                                state=load_loader_state(resume_folder, "pt") if resume_folder else None)
    val_kwargs = {key: value for key, value in loader_kwargs.items() if key != "seed"}
    val_prompts = build_eval_prompt_loader(config.data, split="val", max_batches=max(config.train.eval_batches, 1),
                                           **val_kwargs) if config.train.eval_every else None  # 0: no validation
    prompt_batches, pt_batches = iter(prompt_loader), iter(pt_loader)
    generator = torch.Generator(device=runtime.device).manual_seed(config.run.seed * 7 + runtime.rank)
    buffer, round_stats, position = None, {}, 0
    if rank_state is not None:
        restore_rng_state(rank_state["rng"])
        generator.set_state(rank_state["generator"])
        if rank_state.get("buffer") is not None:
            buffer, round_stats, position = rank_state["buffer"], rank_state["round_stats"], rank_state["position"]
            buffer = [{key: (value.to(runtime.device) if isinstance(value, torch.Tensor) else value)
                       for key, value in entry.items()} for entry in buffer]
    else:
        seed_everything(config.run.seed + runtime.rank)

    config_yaml, metrics, stopper = start_outputs(config, runtime, state.step)
    exit_code = 0
    if state.step == 0 and config.train.eval_every:
        metrics.log(0, evaluate(engines, config, runtime, val_prompts))  # the starting point of the reverse KL
    engines.student.train()
    while state.step < config.train.max_steps:
        step_start = time.perf_counter()
        step_terms: dict[str, float] = {}
        token_sums = {"rev_kl": 0.0, "clip_frac": 0.0, "tokens": 0.0}  # per-token statistics, summed over tokens
        for _ in range(config.train.grad_accum):
            if buffer is None:  # an optimizer step may span rounds: the next buffer is collected mid-accumulation
                buffer, round_stats = collect_rollouts(engines, config, runtime, prompt_batches, generator)
                position = 0
            epoch, index = divmod(position, micro_per_round)
            entry = buffer[_micro_order(config, state.extra["round"], epoch, micro_per_round)[index]]
            pt_batch = to_device(next(pt_batches), runtime.device, runtime.dtype)
            terms = _policy_step(engines, config, entry, pt_batch)
            engines.student.backward(terms["loss"])
            engines.student.step()
            position += 1
            if position == micro_per_round * settings.ppo_epochs:
                buffer, position = None, 0
                state.extra["round"] += 1
            terms = {name: float(value.detach()) for name, value in terms.items()}
            tokens = float(entry["response_mask"].sum())
            # The single-step term is the unweighted token mean of the exact reverse KL of this micro-batch.
            token_sums["rev_kl"] += terms["single_step_loss"] * tokens
            token_sums["clip_frac"] += terms.pop("clip_frac") * tokens
            token_sums["tokens"] += tokens
            for name, value in terms.items():
                step_terms[name] = step_terms.get(name, 0.0) + value / config.train.grad_accum
        state.step += 1
        record = reduce_mean(step_terms, runtime.world_size)
        token_sums = reduce_sum(token_sums, runtime.world_size)
        record.update(round_stats)  # already reduced over ranks when the round was collected
        record.update(rev_kl=token_sums["rev_kl"] / max(token_sums["tokens"], 1.0),
                      clip_frac=token_sums["clip_frac"] / max(token_sums["tokens"], 1.0),
                      lr=float(engines.scheduler.get_last_lr()[0]), step_time_s=time.perf_counter() - step_start)
        is_best = False
        if config.train.eval_every and (state.step % config.train.eval_every == 0 or
                                        state.step == config.train.max_steps):
            record.update(evaluate(engines, config, runtime, val_prompts))
            if state.best_val_loss is None or record["val_loss"] < state.best_val_loss:
                state.best_val_loss, state.best_tag, is_best = record["val_loss"], ckpt.tag_for_step(state.step), True
        if state.step % config.run.log_every == 0 or "val_loss" in record or state.step == config.train.max_steps:
            metrics.log(state.step, record)
        metrics.progress(state.step, {k: v for k, v in record.items()
                                      if k in ("loss", "pg_loss", "rev_kl", "pt_loss", "reward", "val_loss")})
        # The step limit is the same on every rank (config), so it needs no agreement; signals do.
        stop = stopper.should_stop() or (config.run.stop_at_step > 0 and state.step >= config.run.stop_at_step)
        if state.step % config.checkpoint.every_steps == 0 or state.step == config.train.max_steps or stop or is_best:
            cpu_buffer = None if buffer is None else [
                {key: (value.cpu() if isinstance(value, torch.Tensor) else value) for key, value in entry.items()}
                for entry in buffer]
            save(engines, config, runtime, state, config_yaml, loaders={"prompt": prompt_loader, "pt": pt_loader},
                 extra={"generator": generator.get_state(), "buffer": cpu_buffer, "round_stats": round_stats,
                        "position": position})
        if stop:
            exit_code = RESUME_EXIT_CODE
            break
    metrics.close()
    write_partition_report(engines, output_dir, runtime.rank)
    return exit_code
