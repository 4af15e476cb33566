"""Teacher-mixed ancestral sampling for stage 2 (paper eq. 8; MiniLLM's teacher-mixed sampling).

Each decode step draws the next response token from the mixture, in probability space,

    p̃(· | y_<t, x) = mix_alpha · p(· | y_<t, x) + (1 − mix_alpha) · q(· | y_<t, x),

where p is the teacher and q the student. Both models run side by side with their own KV caches: the first forward
of each model sees the whole left-padded prompt and the image (so the vision tower and projector run once per model
and prompt); every later step feeds only the newest token, the full attention mask and its position id.

What the rollout records, per sampled token (all fp32, from fp32 log-softmax of the models' logits):
- `student_logprob` = log q(y_t) and `teacher_logprob` = log p(y_t) of the RAW distributions (no temperature, no
  top-k/top-p): the rewards r_t = log p − log q must use the models' true log-probabilities.
- `mixed_logprob` = log p̃(y_t) of the distribution the token was ACTUALLY drawn from: the tempered mixture after
  top-k/top-p filtering. The importance weight q(y_t) / p̃(y_t) then corrects from the real sampling distribution
  to the raw student. With the defaults (temperature 1, top_k 0, top_p 1) the sampling mixture is the raw mixture.

Order of the sampling transforms (the same order as transformers' `generate`): temperature is applied to each
model's logits, the two tempered distributions are mixed, then top-k and then top-p filter the mixture.

Sampling is by inverse CDF with exactly one uniform draw per row and step from the passed `torch.Generator`
(finished rows draw too). The random stream is therefore independent of the logits: the KV-cached path and the
no-cache reference path draw the same tokens (unless a uniform lands within rounding error of a CDF boundary), and
a resumed run that restores the generator state reproduces its rollouts. Rows stop independently: the first EOS is a target (mask 1); afterwards the row emits `pad_token_id`
with mask 0 and its recorded log-probabilities are 0.

On an accelerator the loop itself does no per-token host synchronisation: its only `.item()` is the "all rows
finished" check every `check_every` steps (transformers' attention-mask helpers may still test `mask.all()` inside
a forward). With `sync_ranks=True` that check sums the unfinished-row count over the default process group, so
every rank runs the same number of forwards (required when ZeRO-3 partitions the parameters, because each forward
gathers them collectively). The returned length T is the number of decode steps run: at most `max_new_tokens`,
and it may include up to `check_every − 1` trailing all-pad columns.

Callers put both models in eval mode (dropout off) before sampling; this function does not change module modes.
"""

import logging
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

logger = logging.getLogger(__name__)

# A sampled token that a model gives probability 0 (logit −inf, e.g. a masked vocab row) would carry log-prob −inf
# into rewards and weights; it is floored here (e^−10000 is 0 in any float format) so later sums stay finite and
# the reward clip bounds it.
LOG_PROB_FLOOR = -1.0e4


@dataclass
class MixedRollout:
    """One batch of teacher-mixed rollouts; every tensor is (B, T) with T the number of decode steps run."""

    tokens: torch.Tensor
    """(B, T) long: sampled response tokens, `pad_token_id` after a row's first EOS."""
    mask: torch.Tensor
    """(B, T) long: 1 on response tokens up to and including the first EOS, 0 after it."""
    student_logprob: torch.Tensor
    """(B, T) fp32: log q(y_t | y_<t, x) of the raw student distribution; 0 where mask is 0."""
    teacher_logprob: torch.Tensor
    """(B, T) fp32: log p(y_t | y_<t, x) of the raw teacher distribution (truncated to the student vocab); 0 where
    mask is 0."""
    mixed_logprob: torch.Tensor
    """(B, T) fp32: log p̃(y_t) of the tempered, filtered mixture actually sampled from; 0 where mask is 0."""

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) long: response length of each row, the first EOS included."""
        return self.mask.sum(dim=-1)


def mixture_log_probs(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    mix_alpha: float,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw student and teacher log-probs and the sampling mixture's log-probs for one decode step.

    Args:
        student_logits: (B, V) student logits of the next token.
        teacher_logits: (B, V) teacher logits, already truncated to the student's vocabulary.
        mix_alpha: teacher weight α of the mixture α·p + (1 − α)·q.
        temperature, top_k, top_p: sampling transforms (see the module docstring for their order).

    Returns:
        (student_logprob, teacher_logprob, sampling_logprob), each (B, V) fp32. The first two are raw
        log-softmaxes; the third is the normalised log of the tempered, filtered mixture (−inf on filtered tokens).
    """
    student_logprob = torch.log_softmax(student_logits.float(), dim=-1)  # (B, V)
    teacher_logprob = torch.log_softmax(teacher_logits.float(), dim=-1)  # (B, V)
    if temperature == 1.0:
        student_tempered, teacher_tempered = student_logprob, teacher_logprob
    else:
        student_tempered = torch.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, V)
        teacher_tempered = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (B, V)
    # Mixing in log space keeps α = 0 and α = 1 exact: log(0) = −inf and logaddexp(−inf, a) = a.
    log_teacher_weight = math.log(mix_alpha) if mix_alpha > 0 else -math.inf
    log_student_weight = math.log1p(-mix_alpha) if mix_alpha < 1 else -math.inf
    sampling_logprob = torch.logaddexp(
        teacher_tempered + log_teacher_weight, student_tempered + log_student_weight
    )  # (B, V)
    if top_k > 0 or top_p < 1.0:
        if top_k > 0:
            sampling_logprob = TopKLogitsWarper(top_k=top_k)(None, sampling_logprob)
        if top_p < 1.0:
            sampling_logprob = TopPLogitsWarper(top_p=top_p)(None, sampling_logprob)
        sampling_logprob = torch.log_softmax(sampling_logprob, dim=-1)  # (B, V) renormalised after filtering
    return student_logprob, teacher_logprob, sampling_logprob


def draw_tokens(sampling_logprob: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Inverse-CDF draw of one token per row from exp(sampling_logprob), using one uniform per row.

    `torch.multinomial` would also work, but its use of the random stream depends on the probabilities; one
    uniform per row keeps the stream identical across code paths and devices. Returns (B,) long.
    """
    probs = sampling_logprob.exp()  # (B, V)
    cdf = probs.cumsum(dim=-1)  # (B, V)
    uniform = torch.rand(
        (probs.shape[0], 1), generator=generator, device=probs.device, dtype=cdf.dtype
    )  # (B, 1)
    tokens = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).squeeze(-1)  # (B,)
    # Rounding can put the scaled uniform on the final CDF value; never step past the last token with mass.
    vocab_index = torch.arange(probs.shape[-1], device=probs.device)  # (V,)
    last_with_mass = torch.where(probs > 0, vocab_index, -1).amax(dim=-1)  # (B,)
    return torch.minimum(tokens, last_with_mass)


class _NextTokenLogits:
    """Runs one model step by step: the first call sees the whole prompt and the image, later calls (with a KV
    cache) only the newest token. Without a cache every call recomputes the full sequence and re-encodes the
    image: the reference path for tests and benchmarks."""

    def __init__(self, model: torch.nn.Module, pixel_values: torch.Tensor | None, use_cache: bool):
        self.model = model
        self.pixel_values = pixel_values
        self.use_cache = use_cache
        self.cache = None

    def __call__(
        self, sequence_ids: torch.Tensor, sequence_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """sequence_ids, sequence_mask, position_ids: (B, L) prompt plus response so far. Returns (B, V) logits of
        the next token."""
        if self.cache is None:
            image_inputs = {} if self.pixel_values is None else {"pixel_values": self.pixel_values}
            outputs = self.model(
                input_ids=sequence_ids,
                attention_mask=sequence_mask,
                position_ids=position_ids,
                use_cache=self.use_cache,
                logits_to_keep=1,
                **image_inputs,
            )
            if self.use_cache:
                self.cache = outputs.cache
        else:
            outputs = self.model(
                input_ids=sequence_ids[:, -1:],  # (B, 1) newest token only
                attention_mask=sequence_mask,  # (B, L) the cache holds the keys of the first L − 1 positions
                position_ids=position_ids[:, -1:],  # (B, 1)
                cache=self.cache,
                use_cache=True,
                logits_to_keep=1,
            )
            self.cache = outputs.cache
        return outputs.logits[:, -1, :]  # (B, V)


def _all_rows_finished(finished: torch.Tensor, sync_ranks: bool) -> bool:
    """The loop's only host synchronisation; with sync_ranks every rank gets the same answer."""
    unfinished_rows = (~finished).sum()  # () long, on the models' device
    if sync_ranks:
        dist.all_reduce(unfinished_rows, op=dist.ReduceOp.SUM)
    return unfinished_rows.item() == 0


def _check_arguments(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    mix_alpha: float,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
    check_every: int,
    sync_ranks: bool,
) -> None:
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"sample_mixed: input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
            "must both be (batch, prompt_length)."
        )
    if not 0.0 <= mix_alpha <= 1.0:
        raise ValueError(f"sample_mixed: mix_alpha={mix_alpha} must lie in [0, 1] (the teacher's weight).")
    if max_new_tokens < 1 or check_every < 1:
        raise ValueError(
            f"sample_mixed: max_new_tokens={max_new_tokens} and check_every={check_every} must be at least 1."
        )
    if temperature <= 0.0 or top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(
            f"sample_mixed: need temperature > 0, top_k >= 0 and 0 < top_p <= 1; got temperature={temperature}, "
            f"top_k={top_k}, top_p={top_p}."
        )
    if generator is not None and generator.device.type != input_ids.device.type:
        raise ValueError(
            f"sample_mixed: the generator lives on {generator.device} but the inputs on {input_ids.device}; "
            "create it with torch.Generator(device=input_ids.device)."
        )
    if sync_ranks and not dist.is_initialized():
        raise ValueError("sample_mixed: sync_ranks=True needs an initialised torch.distributed process group.")
    # One host sync per rollout: right padding would place new tokens after pads, which silently corrupts them.
    if not bool(attention_mask[:, -1].all()):
        raise ValueError(
            "sample_mixed: every prompt must end in a real token (attention_mask[:, -1] == 1); "
            "pad prompts on the LEFT (tokenizer.padding_side = 'left')."
        )


@torch.no_grad()
def sample_mixed(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    *,
    mix_alpha: float = 0.2,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    check_every: int = 16,
    sync_ranks: bool = False,
    banned_token_ids: tuple[int, ...] = (),
) -> MixedRollout:
    """Sample responses from α·teacher + (1 − α)·student and record the log-probabilities stage 2 needs.

    Args:
        student, teacher: causal LMs called as `model(input_ids=, attention_mask=, position_ids=, cache=,
            use_cache=, logits_to_keep=, [pixel_values=])` returning `.logits` and `.cache`
            (`LlavaForConditionalGeneration`, `LlamaForCausalLM`, or a DeepSpeed engine around one). The teacher
            always runs, also at mix_alpha = 0, because its log-probs feed the rewards. Its vocabulary may carry
            extra padding rows; they are dropped to the student's vocabulary size.
        input_ids, attention_mask: (B, P) LEFT-padded prompts; position ids are cumsum(mask) − 1, clamped at 0.
        pixel_values: (B, C, H, W) images for the image placeholders in the prompts, or None for text only.
        mix_alpha: teacher weight α.
        max_new_tokens: decode steps at most.
        eos_token_id, pad_token_id: end-of-response token (kept as a target) and the filler emitted after it.
        temperature, top_k, top_p: sampling transforms; the defaults are pure ancestral sampling.
        generator: the only source of randomness; must live on the inputs' device.
        use_cache: False recomputes the full sequence (and the image features) every step: the reference path.
        check_every: steps between "all rows finished" checks (the loop's only host synchronisation).
        sync_ranks: make that check collective over the default process group. Required when the forwards are
            collective (ZeRO-3 with partitioned parameters); harmless otherwise. Under ZeRO-3, decode inside
            `kd_pipeline.sampling.zero3.gathered_for_decoding(student, teacher)` so each forward does not
            all-gather every layer again.
    """
    _check_arguments(
        input_ids,
        attention_mask,
        mix_alpha=mix_alpha,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generator=generator,
        check_every=check_every,
        sync_ranks=sync_ranks,
    )
    banned = torch.tensor(banned_token_ids, dtype=torch.long, device=input_ids.device) if banned_token_ids else None
    student_step = _NextTokenLogits(student, pixel_values, use_cache)
    teacher_step = _NextTokenLogits(teacher, pixel_values, use_cache)
    batch_size = input_ids.shape[0]
    sequence_ids = input_ids  # (B, L) grows by one column per step
    sequence_mask = attention_mask.long()  # (B, L)
    finished = torch.zeros(batch_size, dtype=torch.bool, device=input_ids.device)  # (B,)
    columns: dict[str, list[torch.Tensor]] = {name: [] for name in ("tokens", "mask", "student", "teacher", "mixed")}

    for step in range(max_new_tokens):
        position_ids = (sequence_mask.cumsum(dim=-1) - 1).clamp(min=0)  # (B, L)
        student_logits = student_step(sequence_ids, sequence_mask, position_ids)  # (B, V)
        teacher_logits = teacher_step(sequence_ids, sequence_mask, position_ids)  # (B, V_teacher)
        vocab_size = student_logits.shape[-1]
        if teacher_logits.shape[-1] < vocab_size:
            raise ValueError(
                f"sample_mixed: the teacher's vocabulary ({teacher_logits.shape[-1]}) is smaller than the "
                f"student's ({vocab_size}); the two models must share a tokenizer."
            )
        student_logprob, teacher_logprob, sampling_logprob = mixture_log_probs(
            student_logits,
            teacher_logits[:, :vocab_size],
            mix_alpha=mix_alpha,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
        )  # each (B, V)
        if banned is not None:
            sampling_logprob = sampling_logprob.index_fill(-1, banned, float("-inf")).log_softmax(dim=-1)  # (B, V)
        sampled = draw_tokens(sampling_logprob, generator)  # (B,)
        alive = ~finished  # (B,) rows whose token this step is a target
        tokens = torch.where(alive, sampled, pad_token_id)  # (B,)
        for name, logprob in (("student", student_logprob), ("teacher", teacher_logprob), ("mixed", sampling_logprob)):
            token_logprob = logprob.gather(-1, sampled[:, None]).squeeze(-1).clamp(min=LOG_PROB_FLOOR)  # (B,)
            columns[name].append(torch.where(alive, token_logprob, 0.0))
        columns["tokens"].append(tokens)
        columns["mask"].append(alive.long())
        finished = finished | (tokens == eos_token_id)
        sequence_ids = torch.cat([sequence_ids, tokens[:, None]], dim=-1)  # (B, L + 1)
        sequence_mask = torch.cat([sequence_mask, alive.long()[:, None]], dim=-1)  # (B, L + 1)
        steps_run = step + 1
        if steps_run % check_every == 0 and steps_run < max_new_tokens:
            if _all_rows_finished(finished, sync_ranks):
                break

    logger.debug("sample_mixed: %d decode steps for %d rows", steps_run, batch_size)
    return MixedRollout(
        tokens=torch.stack(columns["tokens"], dim=1),
        mask=torch.stack(columns["mask"], dim=1),
        student_logprob=torch.stack(columns["student"], dim=1),
        teacher_logprob=torch.stack(columns["teacher"], dim=1),
        mixed_logprob=torch.stack(columns["mixed"], dim=1),
    )
