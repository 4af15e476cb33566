"""Decoding a whole rollout buffer in few, large batches instead of one micro-batch at a time.

Stage 2 answers ``minillm.rollouts_per_rank`` prompts per round, which the prompt loader yields in micro-batches.
Decoding each micro-batch on its own leaves an accelerator idle between small decodes (a decode step reads all the
weights whether it has 2 rows or 32). Here consecutive micro-batches are concatenated into decode batches of
``minillm.rollout_batch_size`` prompts (which bounds the KV caches: rows x (prompt + max_new_tokens) positions per
model), each decoded by one ``sample_mixed`` call, and the rollout is split back per micro-batch.

Shapes: every prompt batch is LEFT-padded to its own width P_i; a decode batch re-pads them on the left to the widest
(padding is masked and positions are counted over real tokens, so a row's logits do not depend on it beyond
rounding). Each micro-batch's share of the rollout is trimmed to its own longest answer, so the buffer holds no
columns that only other micro-batches needed. Image rows (``pixel_values``) follow their prompts in order, as LLaVA
scatters image features over the image tokens in row order.

The random stream: ``sample_mixed`` draws one uniform per row and step, so the tokens depend on how rows are grouped;
a fixed grouping (the config's) and the saved generator keep rollouts reproducible.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from kd_pipeline.sampling.mixed import MixedRollout


def concat_prompts(prompt_batches: list[dict], pad_token_id: int) -> dict:
    """One left-padded batch from several: ``input_ids``/``attention_mask`` (sum B_i, max P_i) and the image rows
    of all of them (or None when there are none)."""
    width = max(batch["input_ids"].shape[1] for batch in prompt_batches)
    input_ids = torch.cat([F.pad(batch["input_ids"], (width - batch["input_ids"].shape[1], 0), value=pad_token_id)
                           for batch in prompt_batches])  # (sum B_i, P)
    attention_mask = torch.cat([F.pad(batch["attention_mask"], (width - batch["attention_mask"].shape[1], 0),
                                      value=0) for batch in prompt_batches])  # (sum B_i, P)
    images = [batch["pixel_values"] for batch in prompt_batches
              if batch.get("pixel_values") is not None and batch["pixel_values"].shape[0] > 0]
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "pixel_values": torch.cat(images) if images else None}  # (N_img, 3, S, S)


def split_rollout(rollout: MixedRollout, sizes: list[int]) -> list[MixedRollout]:
    """``rollout`` (sum sizes, T) back into consecutive row blocks of ``sizes``, each trimmed to its longest answer
    (at least one column: every row's first token is a target)."""
    parts = []
    start = 0
    for size in sizes:
        rows = slice(start, start + size)
        length = max(int(rollout.mask[rows].sum(dim=-1).max()), 1)
        parts.append(MixedRollout(**{name: getattr(rollout, name)[rows, :length].contiguous()
                                     for name in ("tokens", "mask", "student_logprob", "teacher_logprob",
                                                  "mixed_logprob")}))
        start += size
    return parts


def decode_in_batches(prompt_batches: list[dict], batches_per_decode: int, decode: Callable[[dict], MixedRollout],
                      *, pad_token_id: int) -> list[MixedRollout]:
    """One ``MixedRollout`` per prompt batch, decoded ``batches_per_decode`` consecutive batches at a time (<= 0: all
    in one decode) by ``decode(prompts)`` (``prompts`` holds ``input_ids``, ``attention_mask`` and ``pixel_values``).

    Grouping by batch count, not rows, keeps the number of ``decode`` calls the same on every rank that holds the same
    number of batches, whatever their sizes: under ZeRO-3 (``sync_ranks``) every call is collective.
    """
    step = batches_per_decode if batches_per_decode > 0 else max(len(prompt_batches), 1)
    rollouts: list[MixedRollout] = []
    for start in range(0, len(prompt_batches), step):
        batches = prompt_batches[start:start + step]
        prompts = batches[0] if len(batches) == 1 else concat_prompts(batches, pad_token_id)
        rollouts.extend(split_rollout(decode(prompts), [batch["input_ids"].shape[0] for batch in batches]))
    return rollouts
