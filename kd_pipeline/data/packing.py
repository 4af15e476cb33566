"""Padding-free packing of training micro-batches (``data.packing``): the row plan, the forward that keeps packed
samples apart, and the arithmetic of how much of a batch is padding.

The rule that keeps steps and resume exact: packing changes the LAYOUT of a micro-batch, never its CONTENT. The
loader still deals exactly ``train.micro_batch_size`` samples per micro-batch (``pipeline.EpochDataset``), so steps
per epoch, equal steps on every rank and the loader state (samples consumed per worker) are what they are
without packing. ``collate.collate_packed`` then lays those samples into as few rows as fit a row of the
micro-batch's longest sample (``plan_rows``): a packed batch never holds more positions than the padded one.

Inside a row, position ids restart at 0 for each sample and the labels of each sample's first position are
ignored (otherwise the previous sample's last position would be trained to predict it). Attention stays within each
sample (``forward_batch``):

- ``sdpa`` / ``eager``: the model gets ``position_ids`` and NO 2-D attention mask; transformers (masking_utils,
  ``find_packed_sequence_indices``) then reads the sample boundaries from the position ids (a new sample wherever
  the position does not grow by one) and builds a causal mask that is block-diagonal per sample. That detection
  runs only when ``attention_mask is None`` and no cache is used (``use_cache=False``).
- ``flash_attention_2``: transformers detects packing from position ids only for ONE row, so the batch's real
  tokens are joined into one unpadded sequence (every pad dropped, whatever the row plan) and flash-attn's varlen
  kernel runs on it; the hidden states are put back in the packed layout for the losses. cu_seqlens are not
  passed explicitly: LLaVA forwards extra keyword arguments to the vision tower as well, whose attention they
  would wrongly split.

Everything a loss reads (labels, the image features in image-block order, the supervised-token count) is the padded
batch's, so the loss and its gradients equal the padded batch's up to float summation order.
Stage-2 rollouts are never packed: the policy terms read each row's response at a fixed column offset after a
left-padded prompt.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

FLASH_BACKENDS = ("flash_attention_2", "flash_attention_3")
"""Attention backends that take packed sequences as one row (transformers' varlen path from position ids)."""


def plan_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices of ``lengths`` grouped into rows whose lengths sum to at most ``capacity``.

    Samples are placed longest first (ties by index, so the plan is deterministic), each into the first row with
    room. Written here rather than taken from TRL's ``pack_dataset``: that packs a whole dataset into fixed-length
    rows, which would change the samples per step that exact resume counts on.
    """
    if any(length > capacity for length in lengths):
        raise ValueError(f"a sample of {max(lengths)} tokens cannot fit a row of {capacity}")
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda position: (-lengths[position], position)):
        length = lengths[index]
        row = next((row for row, free in enumerate(room) if free >= length), None)
        if row is None:
            rows.append([index])
            room.append(capacity - length)
        else:
            rows[row].append(index)
            room[row] -= length
    return rows


def forward_batch(model, batch: dict, **kwargs):
    """``model(...)`` on a padded or a packed batch: ``model`` is a ``LlavaModel`` (LLaVA without its LM head).

    Returns the model's output whose ``last_hidden_state`` is (R, L, H) and aligned with ``batch["input_ids"]``
    (R, L) in either case; ``kwargs`` (``pixel_values``) are passed on. Never uses a KV cache.
    """
    if not batch.get("packed"):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=batch.get("position_ids"), use_cache=False, **kwargs)
    if model.config.text_config._attn_implementation not in FLASH_BACKENDS:
        return model(input_ids=batch["input_ids"], attention_mask=None, position_ids=batch["position_ids"],
                     use_cache=False, **kwargs)
    real = batch["attention_mask"].bool()  # (R, L)
    output = model(input_ids=batch["input_ids"][real][None], attention_mask=None,  # (1, N_real)
                   position_ids=batch["position_ids"][real][None], use_cache=False, **kwargs)
    flat = output.last_hidden_state[0]  # (N_real, H)
    layout = real[..., None].expand(*real.shape, flat.shape[-1])  # (R, L, H)
    output.last_hidden_state = flat.new_zeros(layout.shape).masked_scatter(layout, flat)  # pads: zeros, unused
    return output


def token_fractions(lengths: Sequence[int], micro_batch_size: int) -> dict[str, float]:
    """Non-pad share of the positions a model runs, for ``lengths`` taken ``micro_batch_size`` at a time in order.

    ``padded``: every row as long as the micro-batch's longest sample (``collate_right_padded``);
    ``packed_rows``: ``plan_rows`` with that length as the row capacity (sdpa/eager); ``packed_flat``: one
    unpadded sequence (flash-attn), 1.0 by construction. A last partial micro-batch counts as it is.
    """
    real = padded = packed = 0
    for start in range(0, len(lengths), micro_batch_size):
        group = list(lengths[start:start + micro_batch_size])
        longest = max(group)
        rows = plan_rows(group, longest)
        real += sum(group)
        padded += len(group) * longest
        packed += len(rows) * max(sum(group[index] for index in row) for row in rows)
    if real == 0:
        return {"padded": math.nan, "packed_rows": math.nan, "packed_flat": math.nan}
    return {"padded": real / padded, "packed_rows": real / packed, "packed_flat": 1.0}
