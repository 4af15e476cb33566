"""Turning one raw tar sample (``{"__key__", "json": bytes, "<ext>": image bytes}``) into model inputs.

Three encoders, one per loader kind, all callables ``raw sample -> EncodedItem`` that raise ``BadSample``:

- ``InstructEncoder``: a GeoChat instruction record rendered with the training template and labelled exactly as
  GeoChat's ``preprocess_v1`` (``kd_pipeline.prompts.encode_conversation``).
- ``PromptEncoder``: the conversation up to and including its LAST human turn with an open ``ASSISTANT:`` slot, for
  stage-2 rollouts (no labels).
- ``PretrainEncoder``: a pre-training record: ``BOS + text + EOS``, every text token supervised; with an image the text
  is its caption, placed after the image block (``<image>\\n`` + caption, as LLaVA's plain captioning format).

Checks run cheapest first, so a sample rejected for its text never has its image decoded. Reasons counted:
``bad_json``, ``bad_record``, ``missing_image``, ``unexpected_image``, ``image_token_without_image``,
``image_without_token``, ``image_token_count``, ``image_truncated`` (the image placeholder follows the system prompt,
so a tiny ``max_length`` can cut it), ``tokenization_mismatch`` (GeoChat would train on a fully masked
sample; we skip it and count it), ``prompt_too_long``, ``empty_text``, and the image reasons of ``images.py``.
Truncation (text longer than ``max_length``) keeps the sample and is counted separately.

``BadSampleLog`` is the rate-limited logger + counter every stage reports to: the first ``first`` occurrences of each
reason are logged, then every ``every``-th.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np

from kd_pipeline.data import images
from kd_pipeline.prompts import (IGNORE_INDEX, IMAGE_TOKEN, encode_conversation, expand_image, render,
                                 tokenize_with_image)

log = logging.getLogger(__name__)


class BadSample(Exception):
    """A sample that is skipped; ``reason`` is the counted code, ``detail`` what exactly was wrong."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class BadSampleLog:
    """Counts problems per reason; logs the first ``first`` of each reason, then every ``every``-th."""

    def __init__(self, where: str, first: int = 5, every: int = 100) -> None:
        self.where = where
        self.first = first
        self.every = every
        self.counts: dict[str, int] = {}

    def record(self, key: str, reason: str, detail: str) -> None:
        count = self.counts.get(reason, 0) + 1
        self.counts[reason] = count
        if count <= self.first or count % self.every == 0:
            log.warning("%s: %s at %r (occurrence %d), skipped: %s", self.where, reason, key, count, detail)


@dataclass
class EncodedItem:
    key: str
    input_ids: list[int]                 # (L,) image block already expanded to num_image_tokens ids
    labels: list[int] | None             # (L,) IGNORE_INDEX where unsupervised; None for prompts
    pixel_values: np.ndarray | None      # (3, S, S) float32, or None for text-only samples
    truncated: bool = False
    repeat: bool = False                 # set by the pipeline: a padding duplicate at an epoch end


@dataclass(frozen=True)
class EncodingSettings:
    """Everything an encoder needs; plain data plus the tokenizer, so it travels to DataLoader workers."""

    tokenizer: object
    image_token_id: int
    num_image_tokens: int
    image_size: int
    max_image_pixels: int
    template: str = "vicuna_v1"
    max_length: int = 2048              # text tokens (image = one placeholder) kept; prompts longer are skipped


class _Encoder:
    """Shared parsing and image handling; subclasses implement ``encode_record``."""

    def __init__(self, settings: EncodingSettings) -> None:
        self.settings = settings
        self.images_decoded = 0   # read by the pipeline to report decode work (the resume tests count it)

    def __call__(self, sample: dict) -> EncodedItem:
        key = sample["__key__"]
        record = self._record(sample)
        image_bytes = self._image_bytes(sample, record)
        item = self.encode_record(key, record, has_image=image_bytes is not None)
        expected = self.settings.num_image_tokens if image_bytes is not None else 0
        found = sum(1 for token in item.input_ids if token == self.settings.image_token_id)
        if found != expected and item.truncated and found == 0:
            raise BadSample("image_truncated", f"max_length {self.settings.max_length} cuts the text before its "
                                               f"image placeholder")
        if found != expected:
            raise BadSample("image_token_count", f"{found} image placeholder ids, expected {expected} "
                                                 f"(is there an {IMAGE_TOKEN} outside the first human turn?)")
        if image_bytes is not None:
            item.pixel_values = self._decode(image_bytes)
        return item

    def encode_record(self, key: str, record: dict, *, has_image: bool) -> EncodedItem:
        raise NotImplementedError

    @staticmethod
    def _record(sample: dict) -> dict:
        payload = sample.get("json")
        if payload is None:
            raise BadSample("bad_json", "no .json member")
        try:
            record = json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise BadSample("bad_json", str(error)) from error
        if not isinstance(record, dict):
            raise BadSample("bad_json", f"expected a JSON object, got {type(record).__name__}")
        return record

    @staticmethod
    def _image_bytes(sample: dict, record: dict) -> bytes | None:
        ext = record.get("image_ext")
        if ext:
            if ext not in sample:
                raise BadSample("missing_image", f"the record names a .{ext} image the tar does not hold")
            return sample[ext]
        stray = sorted(name for name in sample if name not in ("json", "__key__", "__url__", "__local_path__"))
        if stray:
            raise BadSample("unexpected_image", f"members {stray} but the record has no image_ext")
        return None

    def _decode(self, image_bytes: bytes) -> np.ndarray:
        self.images_decoded += 1
        try:
            return images.preprocess_image(image_bytes, image_size=self.settings.image_size,
                                           max_pixels=self.settings.max_image_pixels)
        except images.ImageError as error:
            raise BadSample(error.reason, str(error)) from error

    def _check_image_mention(self, text: str, has_image: bool) -> None:
        if has_image and IMAGE_TOKEN not in text:
            raise BadSample("image_without_token", f"the record has an image but no {IMAGE_TOKEN} in its text")
        if not has_image and IMAGE_TOKEN in text:
            raise BadSample("image_token_without_image", f"{IMAGE_TOKEN} in the text but the record has no image")


def _conversations(record: dict) -> list[dict]:
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadSample("bad_record", "no 'conversations' list")
    for index, turn in enumerate(turns):
        expected_role = ("human", "gpt")[index % 2]
        if not isinstance(turn, dict) or turn.get("from") != expected_role or not isinstance(turn.get("value"), str):
            raise BadSample("bad_record", f"turn {index} must be {{'from': {expected_role!r}, 'value': str}}")
    return turns


class InstructEncoder(_Encoder):
    """Training sample: GeoChat's rendering and ``preprocess_v1`` labels."""

    def encode_record(self, key: str, record: dict, *, has_image: bool) -> EncodedItem:
        settings = self.settings
        turns = _conversations(record)
        self._check_image_mention(turns[0]["value"], has_image)
        encoded = encode_conversation(turns, settings.tokenizer, image_token_id=settings.image_token_id,
                                      num_image_tokens=settings.num_image_tokens, template=settings.template,
                                      max_length=settings.max_length)
        if encoded.mismatch:
            raise BadSample("tokenization_mismatch", "GeoChat's label bookkeeping disagrees with the token count")
        return EncodedItem(key, encoded.input_ids, encoded.labels, None, truncated=encoded.truncated)


class PromptEncoder(_Encoder):
    """Rollout prompt: the turns up to the last human one, ending in an open ``ASSISTANT:`` slot."""

    def encode_record(self, key: str, record: dict, *, has_image: bool) -> EncodedItem:
        settings = self.settings
        turns = _conversations(record)
        self._check_image_mention(turns[0]["value"], has_image)
        last_human = max(index for index, turn in enumerate(turns) if turn["from"] == "human")
        text = render(turns[:last_human + 1], settings.template, open_answer=True)
        input_ids = tokenize_with_image(text, settings.tokenizer, settings.image_token_id)
        if len(input_ids) > settings.max_length:
            # Cutting either end would drop the image block or the open answer slot: skip, counted.
            raise BadSample("prompt_too_long", f"{len(input_ids)} tokens > max prompt length {settings.max_length}")
        input_ids, _ = expand_image(input_ids, input_ids, settings.image_token_id, settings.num_image_tokens)
        return EncodedItem(key, input_ids, None, None)


class PretrainEncoder(_Encoder):
    """Pre-training sample: ``BOS + text + EOS`` all supervised (image placeholders masked), cut to max_length."""

    def encode_record(self, key: str, record: dict, *, has_image: bool) -> EncodedItem:
        settings = self.settings
        text = record.get("text")
        if not isinstance(text, str) or not text.strip():
            raise BadSample("empty_text", "no non-empty 'text' field")
        if IMAGE_TOKEN in text:
            raise BadSample("image_token_count", f"literal {IMAGE_TOKEN} inside pre-training text")
        tokenizer = settings.tokenizer
        if has_image:
            input_ids = tokenize_with_image(IMAGE_TOKEN + "\n" + text, tokenizer, settings.image_token_id)
        else:
            input_ids = list(tokenizer(text).input_ids)
        input_ids.append(tokenizer.eos_token_id)
        labels = [IGNORE_INDEX if token == settings.image_token_id else token for token in input_ids]
        truncated = len(input_ids) > settings.max_length
        input_ids, labels = expand_image(input_ids[:settings.max_length], labels[:settings.max_length],
                                         settings.image_token_id, settings.num_image_tokens)
        return EncodedItem(key, input_ids, labels, None, truncated=truncated)
