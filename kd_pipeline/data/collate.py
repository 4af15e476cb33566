"""Stacking encoded samples into batches.

Training and pre-training batches are right-padded (GeoChat trains with right padding), or packed several samples
per row when ``data.packing`` is on (``collate_packed``; the rule and why it is exact: ``kd_pipeline.data.packing``).
Rollout prompts are left-padded so every row's last prompt token sits in the same column and generation appends
after it; they are never packed.

Batch fields (B rows, L = longest row):

- ``input_ids`` (B, L) int64, padded with ``pad_id`` (0, LLaMA's unk, as GeoChat)
- ``attention_mask`` (B, L) int64, 1 on real tokens
- ``labels`` (B, L) int64, ``IGNORE_INDEX`` at pads (training batches only)
- ``pixel_values`` (N_img, 3, S, S) float32: the images of the rows that have one, in row order. Text-only rows
  contribute none, since ``LlavaForConditionalGeneration`` assigns image features to image-token blocks in order.
- ``has_image`` (B,) bool, ``is_repeat`` (B,) bool (a padding duplicate at an epoch end), ``keys`` list[str]
- ``num_truncated`` int: samples whose text was cut to ``max_length``

A packed batch (``collate_packed``) has R <= B rows of L = the longest sample, and besides:

- ``position_ids`` (R, L) int64, restarting at 0 for each sample (and for the pad tail of a row)
- ``attention_mask`` (R, L) 1 on real tokens: for counting tokens. The model never gets it as a mask (it would let
  samples of one row see each other); ``packing.forward_batch`` is how a packed batch is run
- ``labels``: each sample's first position ``IGNORE_INDEX`` (the previous sample's last position predicts it)
- ``packed`` True; ``has_image``, ``is_repeat``, ``keys`` and ``pixel_values`` per sample in layout order (row by
  row, left to right: the order LLaVA assigns image features to image-token blocks)

``padding_batch`` builds the fully masked stand-in the validation loader uses to keep ranks in step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch

from kd_pipeline.data.images import blank_image
from kd_pipeline.data.packing import plan_rows
from kd_pipeline.data.samples import EncodedItem
from kd_pipeline.prompts import IGNORE_INDEX


def _pixel_values(items: list[EncodedItem], image_size: int) -> torch.Tensor:
    arrays = [item.pixel_values for item in items if item.pixel_values is not None]
    if not arrays:
        return torch.zeros(0, 3, image_size, image_size, dtype=torch.float32)
    return torch.from_numpy(np.stack(arrays))  # (N_img, 3, S, S)


def _common_fields(items: list[EncodedItem], image_size: int) -> dict:
    return {
        "pixel_values": _pixel_values(items, image_size),
        "has_image": torch.tensor([item.pixel_values is not None for item in items], dtype=torch.bool),  # (B,)
        "is_repeat": torch.tensor([item.repeat for item in items], dtype=torch.bool),  # (B,)
        "keys": [item.key for item in items],
        "num_truncated": sum(item.truncated for item in items),
    }


def collate_right_padded(items: list[EncodedItem], *, pad_id: int, image_size: int) -> dict:
    """Training batch: rows right-padded with ``pad_id``; labels ``IGNORE_INDEX`` at pads."""
    length = max(len(item.input_ids) for item in items)
    input_ids = torch.full((len(items), length), pad_id, dtype=torch.long)          # (B, L)
    labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)      # (B, L)
    attention_mask = torch.zeros((len(items), length), dtype=torch.long)           # (B, L)
    for row, item in enumerate(items):
        size = len(item.input_ids)
        input_ids[row, :size] = torch.tensor(item.input_ids, dtype=torch.long)
        labels[row, :size] = torch.tensor(item.labels, dtype=torch.long)
        attention_mask[row, :size] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            **_common_fields(items, image_size)}


def collate_packed(items: list[EncodedItem], *, pad_id: int, image_size: int) -> dict:
    """Training batch with several samples per row, rows as long as the longest sample (see the module docstring)."""
    lengths = [len(item.input_ids) for item in items]
    width = max(lengths)
    rows = plan_rows(lengths, width)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)           # (R, L)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)       # (R, L)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)            # (R, L)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)              # (R, L)
    for row, members in enumerate(rows):
        start = 0
        for index in members:
            end = start + lengths[index]
            input_ids[row, start:end] = torch.tensor(items[index].input_ids, dtype=torch.long)
            labels[row, start:end] = torch.tensor(items[index].labels, dtype=torch.long)
            labels[row, start] = IGNORE_INDEX
            attention_mask[row, start:end] = 1
            position_ids[row, start:end] = torch.arange(lengths[index])
            start = end
        position_ids[row, start:] = torch.arange(width - start)  # the pad tail is a sequence of its own
    layout = [items[index] for members in rows for index in members]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "position_ids": position_ids, "packed": True, **_common_fields(layout, image_size)}


def training_collate(data_cfg, *, pad_id: int, image_size: int) -> Callable[[list[EncodedItem]], dict]:
    """The collate of training, validation and D_PT batches: packed when ``data_cfg.packing``, else right-padded."""
    collate = collate_packed if data_cfg.packing else collate_right_padded
    return functools.partial(collate, pad_id=pad_id, image_size=image_size)


def collate_left_padded(items: list[EncodedItem], *, pad_id: int, image_size: int) -> dict:
    """Prompt batch: rows left-padded with ``pad_id`` so generation continues every row from the last column."""
    length = max(len(item.input_ids) for item in items)
    input_ids = torch.full((len(items), length), pad_id, dtype=torch.long)          # (B, L)
    attention_mask = torch.zeros((len(items), length), dtype=torch.long)           # (B, L)
    for row, item in enumerate(items):
        size = len(item.input_ids)
        input_ids[row, length - size:] = torch.tensor(item.input_ids, dtype=torch.long)
        attention_mask[row, length - size:] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, **_common_fields(items, image_size)}


def padding_batch(*, bos_id: int, image_token_id: int, num_image_tokens: int, image_size: int) -> dict:
    """One row ``BOS + image block`` with a blank image and every label masked: contributes nothing to a loss.

    It carries an image so that a rank running it exercises the vision tower like its peers (ZeRO-3 gathers are
    collective); ``keys`` is empty so that nothing is recorded for it.
    """
    ids = [bos_id] + [image_token_id] * num_image_tokens
    input_ids = torch.tensor([ids], dtype=torch.long)                               # (1, L)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": torch.full_like(input_ids, IGNORE_INDEX),
        "pixel_values": torch.from_numpy(blank_image(image_size))[None],           # (1, 3, S, S)
        "has_image": torch.tensor([True]),
        "is_repeat": torch.tensor([False]),
        "keys": [],
        "num_truncated": 0,
    }
