"""Stage 2 (``run.stage=minillm``): reverse-KL policy-gradient distillation (paper eq. 6-10, MiniLLM's code).

One round:
1. Rollouts: ``minillm.rollouts_per_rank`` prompts per rank are answered by sampling from the teacher-mixed
   distribution alpha*p + (1-alpha)*q (kd_pipeline/sampling), decoded ``minillm.rollout_batch_size`` prompts at a
   time (0: the whole buffer in one decode; validation decodes under the same bound; sampling/buffer.py) and split
   back into the loader's micro-batches. With ``minillm.gather_params`` both models' ZeRO-3 parameters are gathered
   once for the whole phase (MiniLLM reports ~10x faster than per-token gathers); otherwise generation runs
   partitioned and every rank runs the same number of decode steps (``sync_ranks``).
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

Resume is exact mid-round: a checkpoint taken anywhere stores, per rank, the rollout progress (``progress.py``'s
``RolloutProgress``: the round's buffer, the position in it, the sampler's generator) with the RNG states and both
loaders' states, and ``trainer_state.json`` the round index; a resumed run continues the same round with the same
buffer and reproduces the uninterrupted loss sequence. What a changed config does to a saved round: ``progress.py``.

``minillm.pt_weight=0`` turns the pre-training loss off: no D_PT batch is read, no teacher forward runs for it, and
``data.pt_shards`` is not needed.

Telemetry: every training line has the loss terms averaged over the step's micro-batches and ranks; ``rev_kl`` (the
exact per-position reverse KL of the current student, averaged over the step's response TOKENS on all ranks) and
``clip_frac`` (share of those tokens where PPO's clip is active); and the latest round's statistics over all ranks:
``reward`` (log p - log q per token), ``w_mean`` (token-weighted mean importance weight), ``w_max`` (all-reduce MAX)
and ``len_mixed`` (mean rollout length).

Validation (every ``train.eval_every`` steps) samples student-only answers (alpha = 0) to held-out prompts with a
fixed seed and reports ``val_loss`` = the exact per-position reverse KL KL[q||p] averaged over answer TOKENS (length
normalised; it selects ``best``), ``val_rev_kl_seq`` = the same summed per answer and averaged over answers (by the
chain rule an unbiased, Rao-Blackwellised estimate of the sequence-level KL[q||p]), and ``val_len_student`` (mean
answer length). Per token, a long answer cannot win or lose ``best`` by its length alone.
"""

from __future__ import annotations

import contextlib

import torch

from kd_pipeline.checkpoint import TrainerState
from kd_pipeline.config import Config
from kd_pipeline.data import build_eval_prompt_loader, build_prompt_loader, build_pt_loader
from kd_pipeline.engine.build import Engines
from kd_pipeline.engine.metrics import reduce_max, reduce_mean, reduce_sum
from kd_pipeline.engine.modules import LossSettings, PolicySettings, TeacherOutputs
from kd_pipeline.losses import fused_token_kl
from kd_pipeline.losses.minillm import importance_weights, long_term_advantages, token_rewards, whiten
from kd_pipeline.models import hidden_and_features
from kd_pipeline.progress import RolloutProgress
from kd_pipeline.recipes.common import Session, StepClock, StepEnd, detached, open_session, to_device
from kd_pipeline.runtime import Runtime
from kd_pipeline.sampling import MixedRollout, decode_in_batches, gathered_for_decoding, sample_mixed


# ----------------------------------------------------------------------------------------------------- rollouts


def _sequences(prompts: dict, tokens: torch.Tensor, mask: torch.Tensor) -> dict:
    """Prompt (left-padded, (B, P)) + response ((B, T)) as one batch with positions counted over real tokens."""
    input_ids = torch.cat([prompts["input_ids"], tokens], dim=1)  # (B, P+T)
    attention_mask = torch.cat([prompts["attention_mask"], mask.to(prompts["attention_mask"].dtype)], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, P+T)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    if prompts.get("pixel_values") is not None and prompts["pixel_values"].shape[0] > 0:
        batch["pixel_values"] = prompts["pixel_values"]
    return batch


def sample_buffer(engines: Engines, config: Config, runtime: Runtime, prompt_batches: list[dict],
                  generator: torch.Generator, mix_alpha: float) -> list[MixedRollout]:
    """One rollout per prompt batch, decoded ``minillm.rollout_batch_size`` rows at a time (0: ``rollouts_per_rank``,
    a whole round's buffer; validation has the same bound) inside ONE parameter gather for the whole phase
    (``minillm.gather_params``; sampling/buffer.py). Both models in eval mode."""
    settings = config.minillm

    def decode(prompts: dict) -> MixedRollout:
        images = prompts.get("pixel_values")  # (N_img, 3, S, S); none, or zero rows, for text-only prompts
        return sample_mixed(
            engines.student_llava, engines.teacher_llava, prompts["input_ids"], prompts["attention_mask"],
            images if images is not None and images.shape[0] > 0 else None, mix_alpha=mix_alpha,
            max_new_tokens=settings.max_new_tokens, eos_token_id=engines.tokenizer.eos_token_id,
            pad_token_id=engines.tokenizer.pad_token_id,
            temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p, generator=generator,
            sync_ranks=runtime.world_size > 1, banned_token_ids=(engines.image_token_id,))

    engines.student.eval()
    gathered = gathered_for_decoding(engines.student, engines.teacher) if settings.gather_params \
        else contextlib.nullcontext()
    with gathered:
        rows = settings.rollout_batch_size or settings.rollouts_per_rank  # both multiples of micro_batch_size
        rollouts = decode_in_batches(prompt_batches, rows // config.train.micro_batch_size, decode,
                                     pad_token_id=engines.tokenizer.pad_token_id)
    engines.student.train()
    return rollouts


def score_rollout(engines: Engines, config: Config, prompts: dict, rollout: MixedRollout) -> dict:
    """One buffer entry: the sequences, the teacher's hidden states at the positions predicting the response (the
    single-step term's teacher side, cached for the round), rewards -> advantages (not yet whitened) and weights."""
    settings = config.minillm
    batch = _sequences(prompts, rollout.tokens, rollout.mask)
    teacher = engines.teacher_outputs(batch)  # collective under ZeRO-3: same count on every rank
    length = rollout.tokens.shape[1]
    rewards = token_rewards(rollout.teacher_logprob, rollout.student_logprob, rollout.mask,
                            reward_scaling=settings.reward_scaling, reward_clip=settings.reward_clip)
    gamma = settings.gamma if settings.long_term == "minillm" else 1.0
    return {**batch, "response_tokens": rollout.tokens, "response_mask": rollout.mask,
            "old_logprob": rollout.student_logprob,
            "advantages": long_term_advantages(rewards, rollout.mask, variant=settings.long_term, gamma=gamma),
            "weights": importance_weights(rollout.student_logprob, rollout.mixed_logprob, rollout.mask,
                                          mode=settings.weights, clip=settings.weight_clip or None),
            "teacher_hidden": teacher.hidden[:, -length - 1:-1].contiguous(),  # (B, T, Ht)
            "teacher_features": teacher.features}


def _whiten_advantages(buffer: list[dict]) -> None:
    """MiniLLM whitens the advantages over every valid token of the round, on all ranks (collective)."""
    flat = torch.cat([entry["advantages"][entry["response_mask"].bool()] for entry in buffer])
    flat = whiten(flat[None], torch.ones_like(flat, dtype=torch.bool)[None], distributed=True)[0]
    offset = 0
    for entry in buffer:
        valid = entry["response_mask"].bool()
        entry["advantages"] = torch.zeros_like(entry["advantages"]).masked_scatter(
            valid, flat[offset:offset + int(valid.sum())])
        offset += int(valid.sum())


@torch.no_grad()
def collect_rollouts(engines: Engines, config: Config, runtime: Runtime, prompt_batches,
                     generator: torch.Generator, clock: StepClock) -> tuple[list[dict], dict[str, float]]:
    """One round (collective): the buffer (micro-batches, tensors on the compute device) and its statistics."""
    count = config.minillm.rollouts_per_rank // config.train.micro_batch_size
    prompts = [to_device(clock.next(prompt_batches), runtime.device, runtime.dtype) for _ in range(count)]
    rollouts = sample_buffer(engines, config, runtime, prompts, generator, config.minillm.mix_alpha)
    buffer = [score_rollout(engines, config, batch, rollout) for batch, rollout in zip(prompts, rollouts)]
    if config.minillm.long_term == "minillm":
        _whiten_advantages(buffer)
    valid = [rollout.mask.bool() for rollout in rollouts]
    raw_rewards = [(rollout.teacher_logprob - rollout.student_logprob)[mask] for rollout, mask in zip(rollouts, valid)]
    weights = [entry["weights"][mask] for entry, mask in zip(buffer, valid)]
    stats = round_statistics(torch.cat(raw_rewards), torch.cat(weights),
                             torch.cat([rollout.lengths.float() for rollout in rollouts]))
    return buffer, stats


def round_statistics(raw_rewards: torch.Tensor, weights: torch.Tensor, lengths: torch.Tensor) -> dict[str, float]:
    """The round's rollout statistics over ALL ranks (collective): ``reward`` (log p - log q) and ``w_mean`` are
    token-weighted means over every valid response token, ``w_max`` the largest importance weight on any rank (an
    all-reduce MAX), ``len_mixed`` the mean response length. ``raw_rewards`` and ``weights``: (N_tokens,) this
    rank's valid tokens; ``lengths``: (N_rollouts,)."""
    totals = reduce_sum({"reward_sum": float(raw_rewards.sum()), "weight_sum": float(weights.sum()),
                         "tokens": float(weights.numel()), "length_sum": float(lengths.sum()),
                         "rollouts": float(lengths.numel())})
    # Weights are positive, so 0 is a neutral element of the MAX for a rank without valid tokens.
    w_max = reduce_max({"w_max": float(weights.max()) if weights.numel() else 0.0})["w_max"]
    tokens = max(totals["tokens"], 1.0)
    return {"reward": totals["reward_sum"] / tokens, "w_mean": totals["weight_sum"] / tokens, "w_max": w_max,
            "len_mixed": totals["length_sum"] / max(totals["rollouts"], 1.0)}


# ----------------------------------------------------------------------------------------------------- policy step


def _micro_order(config: Config, round_index: int, epoch: int, count: int) -> list[int]:
    """The order of the buffer's micro-batches in one PPO epoch: seeded, so a resumed run needs no state for it."""
    generator = torch.Generator().manual_seed(config.run.seed * 1_000_003 + round_index * 1009 + epoch)
    return torch.randperm(count, generator=generator).tolist()


def _policy_step(engines: Engines, config: Config, entry: dict, pt_batch: dict | None) -> dict[str, torch.Tensor]:
    """The student's stage-2 terms on one buffer micro-batch (and the D_PT batch, when the PT loss is on)."""
    settings = config.minillm
    rollout_teacher = TeacherOutputs(entry["teacher_hidden"], entry["teacher_features"], engines.teacher_head)
    pt_teacher = engines.teacher_outputs(pt_batch) if pt_batch is not None else None
    return engines.student(
        mode="minillm", rollout=entry, rollout_teacher=rollout_teacher, pt_batch=pt_batch, pt_teacher=pt_teacher,
        policy=PolicySettings(clip_eps=settings.clip_eps, single_step_weight=settings.single_step_weight,
                              long_term_weight=settings.long_term_weight, align_weight=settings.align_weight,
                              chunk_size=config.kd.chunk_size or None),
        pt_settings=LossSettings(alpha_kd=settings.kd_ratio, temperature=1.0, align_weight=0.0, fused=config.kd.fused,
                                 chunk_size=config.kd.chunk_size or None),
        pt_weight=settings.pt_weight)


def train_step(engines: Engines, config: Config, runtime: Runtime, state: TrainerState, progress: RolloutProgress,
               prompt_batches, pt_batches) -> dict[str, float]:
    """One optimizer step of ``train.grad_accum`` buffer micro-batches; a round that runs out mid-step is followed
    by the next one inside the step. Returns the step's record."""
    clock = StepClock(runtime.world_size)
    sums: dict[str, float] = {}
    token_sums = {"rev_kl": 0.0, "clip_frac": 0.0, "tokens": 0.0}  # per-token statistics, summed over tokens
    for _ in range(config.train.grad_accum):
        if progress.buffer is None:
            progress.buffer, progress.round_stats = collect_rollouts(engines, config, runtime, prompt_batches,
                                                                     progress.generator, clock)
            progress.position = 0
        epoch, index = divmod(progress.position, len(progress.buffer))
        entry = progress.buffer[_micro_order(config, state.rollout_round, epoch, len(progress.buffer))[index]]
        pt_batch = None
        if config.minillm.pt_weight > 0:
            pt_batch = to_device(clock.next(pt_batches), runtime.device, runtime.dtype)
            clock.count(pt_batch)
        clock.count(entry)
        terms = _policy_step(engines, config, entry, pt_batch)
        engines.student.backward(terms["loss"])
        engines.student.step()
        progress.position += 1
        if progress.position == len(progress.buffer) * config.minillm.ppo_epochs:
            progress.buffer, progress.position = None, 0
            state.rollout_round += 1
        terms = detached(terms)
        tokens = float(entry["response_mask"].sum())
        # The single-step term is the unweighted token mean of the exact reverse KL of this micro-batch.
        token_sums["rev_kl"] += terms["single_step_loss"] * tokens
        token_sums["clip_frac"] += terms.pop("clip_frac") * tokens
        token_sums["tokens"] += tokens
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value / config.train.grad_accum
    token_sums = reduce_sum(token_sums)
    per_token = max(token_sums.pop("tokens"), 1.0)
    return {**reduce_mean(sums, runtime.world_size), **progress.round_stats,  # round stats: reduced when collected
            **{name: value / per_token for name, value in token_sums.items()},
            "lr": engines.learning_rate(), **clock.record()}


# ----------------------------------------------------------------------------------------------------- validation


def _answer_reverse_kl(engines: Engines, config: Config, prompts: dict, rollout: MixedRollout) -> torch.Tensor:
    """(B, T) exact reverse KL[q || p] at each answer position (0 past each answer's end)."""
    import deepspeed

    batch = _sequences(prompts, rollout.tokens, rollout.mask)
    length = rollout.tokens.shape[1]
    student_hidden, _ = hidden_and_features(engines.student_llava, batch)  # (B, P+T, Hs)
    teacher = engines.teacher_outputs(batch)
    head = engines.student_head
    with deepspeed.zero.GatheredParameters([head], enabled=hasattr(head, "ds_id")):
        return fused_token_kl(student_hidden[:, -length - 1:-1], head, teacher.hidden[:, -length - 1:-1],
                              teacher.head_weight, direction="reverse", mask=rollout.mask.bool(),
                              chunk_size=config.kd.chunk_size or None).kl  # (B, T)


@torch.no_grad()
def evaluate(engines: Engines, config: Config, runtime: Runtime, val_prompts) -> dict[str, float]:
    """Student-only answers to the same held-out prompts each time (fixed seed): the exact per-position reverse KL
    averaged over answer tokens (``val_loss``), the same summed per answer and averaged over answers
    (``val_rev_kl_seq``), and the mean answer length (``val_len_student``)."""
    generator = torch.Generator(device=runtime.device).manual_seed(config.run.seed + 7919 * (runtime.rank + 1))
    padding, batches = [], []
    for prompts in val_prompts:  # padding batches keep the collective decode and forward counts equal
        padding.append(bool(prompts.pop("is_padding", False)))
        batches.append(to_device(prompts, runtime.device, runtime.dtype))
    rollouts = sample_buffer(engines, config, runtime, batches, generator, mix_alpha=0.0)
    engines.student.eval()
    totals = {"kl_sum": 0.0, "tokens": 0.0, "answers": 0.0}
    for is_padding, prompts, rollout in zip(padding, batches, rollouts):
        kl = _answer_reverse_kl(engines, config, prompts, rollout)  # (B, T)
        if not is_padding:
            totals["kl_sum"] += float(kl.sum())
            totals["tokens"] += float(rollout.mask.sum())
            totals["answers"] += float(rollout.tokens.shape[0])
    engines.student.train()
    totals = reduce_sum(totals)
    answers = max(totals["answers"], 1.0)
    return {"val_loss": totals["kl_sum"] / max(totals["tokens"], 1.0), "val_rev_kl_seq": totals["kl_sum"] / answers,
            "val_len_student": totals["tokens"] / answers}


# ----------------------------------------------------------------------------------------------------- the recipe


def _build_loaders(session: Session) -> dict:
    """The prompt stream, the D_PT stream (only when the PT loss is on) and the held-out prompts (when validating)."""
    config, runtime, engines = session.config, session.runtime, session.engines
    kwargs = dict(tokenizer=engines.tokenizer, image_size=config.student.image_size,
                  num_image_tokens=engines.num_image_tokens, micro_batch_size=config.train.micro_batch_size,
                  rank=runtime.rank, world_size=runtime.world_size)
    loaders = {"prompt": build_prompt_loader(config.data, split="train", seed=config.run.seed,
                                             state=session.loader_state("prompt"), **kwargs)}
    if config.minillm.pt_weight > 0:
        loaders["pt"] = build_pt_loader(config.data, seed=config.run.seed, state=session.loader_state("pt"), **kwargs)
    val = build_eval_prompt_loader(config.data, split="val", max_batches=max(config.train.eval_batches, 1),
                                   **kwargs) if config.train.eval_every else None  # 0: no validation
    return {"train": loaders, "val": val}


def run(config: Config, runtime: Runtime) -> int:
    session = open_session(config, runtime, init_from=True)
    config, engines, state = session.config, session.engines, session.state
    loaders = _build_loaders(session)
    progress = RolloutProgress(torch.Generator(device=runtime.device).manual_seed(config.run.seed * 7 + runtime.rank))
    if session.rank_state is not None:  # None after a change of rank count: the generator and the round restart
        progress.restore(session.rank_state.get("rollout", session.rank_state), runtime.device,
                         new_round=session.new_round)
    session.restore_rng()
    end_of_step = StepEnd(session, validate=lambda: evaluate(engines, config, runtime, loaders["val"]),
                          save=lambda: session.save(loaders["train"], extra={"rollout": progress.payload()}))
    if state.step == 0 and config.train.eval_every:
        with session.watchdog.step():
            session.metrics.log(0, evaluate(engines, config, runtime, loaders["val"]))  # where the reverse KL starts
    prompt_batches = iter(loaders["train"]["prompt"])
    pt_batches = iter(loaders["train"]["pt"]) if "pt" in loaders["train"] else None
    engines.student.train()
    stopped = False
    for step in range(state.step + 1, config.train.max_steps + 1):
        with session.watchdog.step():
            record = train_step(engines, config, runtime, state, progress, prompt_batches, pt_batches)
            state.step = step
            stopped = end_of_step(record)
        if stopped:
            break
    return session.close(stopped)
