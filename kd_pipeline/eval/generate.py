"""Batched greedy answers from a GeoChat (transformers LLaVA) model folder: load, encode, pad, generate, decode.

One batch, in order:

1. ``encode_question``: the llava_v1 evaluation prompt ``<system> USER: <image>\\nQ ASSISTANT:`` is tokenized the way
   GeoChat does (``prompts.tokenize_with_image``) and its one ``<image>`` id is expanded to the model's
   ``num_image_tokens`` copies, which transformers' LLaVA replaces by the projected image features.
2. ``left_pad``: the prompts are padded on the LEFT with the pad id (0, unk, as GeoChat) and an attention mask, so
   every row's last prompt token sits in the last column and new tokens are appended after it for all rows at once.
   transformers' ``generate`` derives the position ids from that mask, so a padded row sees the same positions as
   it would alone (the tests check batched answers against one-question-at-a-time greedy decoding).
3. ``load_pixels``: images as GeoChat trains (``data.images.preprocess_image``: RGB, pad to square with the CLIP
   mean colour, resize, normalise). GeoChat's eval scripts skip the square padding; benchmark images are square,
   where both give the same pixels.
4. ``model.generate`` with ``greedy_generation_config``: greedy decoding; a row that emits EOS is finished (later
   columns are pad).
5. ``decode_answer``: the new tokens up to the first EOS, special tokens skipped, stripped (GeoChat's
   ``batch_decode(..., skip_special_tokens=True)[0].strip()``).

Device and dtype (``select_device``): CUDA with bf16 when a GPU is present, else CPU with fp32.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationConfig, LlavaConfig

from kd_pipeline.config import ModelConfig
from kd_pipeline.data.images import ImageError, preprocess_image
from kd_pipeline.errors import UserError
from kd_pipeline.eval.images import MAX_IMAGE_PIXELS
from kd_pipeline.models import load_model, num_image_tokens, unwrap_model
from kd_pipeline.prompts import expand_image, render_eval_prompt, tokenize_with_image
from kd_pipeline.tokenizer import image_token_id, load_tokenizer

logger = logging.getLogger(__name__)

PAD_ID = 0  # GeoChat pads with unk (id 0)
EVAL_TEMPLATE = "llava_v1"
MAX_NEW_TOKENS = 256
"""Default answer length limit of ``eval run`` and of an exported model's generation_config.json."""


class EvalImageError(UserError, ValueError):
    """A benchmark image that cannot be fed to the model, worded with the file and what to do."""


@dataclass
class EvalModel:
    """A model ready for generation and what is needed to feed it."""

    model: nn.Module
    tokenizer: object
    image_token_id: int
    num_image_tokens: int
    image_size: int
    device: torch.device
    dtype: torch.dtype


def select_device(requested: str = "auto", local_rank: int = 0) -> tuple[torch.device, torch.dtype]:
    """``auto``: CUDA device ``local_rank`` with bf16 when available, else CPU with fp32; ``cpu``/``cuda`` force one."""
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device {requested!r} is not one of auto, cpu, cuda")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available; use --device auto or cpu")
    if requested != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", local_rank), torch.bfloat16
    return torch.device("cpu"), torch.float32


def load_eval_model(model_dir: str | Path, device: torch.device, dtype: torch.dtype) -> EvalModel:
    """Load a transformers LLaVA folder (config.json, weights, tokenizer saved beside) for inference.

    The resolution is the checkpoint's own (``vision_config.image_size``; ``kd_pipeline.convert`` stores GeoChat
    checkpoints at 504 px), so the vision tower is used exactly as saved.
    """
    model_dir = Path(model_dir)
    tokenizer = load_tokenizer(model_dir)
    config = LlavaConfig.from_pretrained(str(model_dir), local_files_only=True)
    model_cfg = ModelConfig(path=str(model_dir), image_size=config.vision_config.image_size,
                            patch_size=config.vision_config.patch_size, attn_implementation="auto")
    model = unwrap_model(load_model(model_cfg, dtype=dtype, device=device, vocab_size=len(tokenizer),
                                    image_token_id=image_token_id(tokenizer)))
    model.requires_grad_(False)
    model.eval()
    logger.info("loaded %s on %s in %s (%d px images, %d image tokens)", model_dir, device, dtype,
                model_cfg.image_size, num_image_tokens(model_cfg))
    return EvalModel(model=model, tokenizer=tokenizer, image_token_id=image_token_id(tokenizer),
                     num_image_tokens=num_image_tokens(model_cfg), image_size=model_cfg.image_size,
                     device=device, dtype=dtype)


def free_eval_model(eval_model: EvalModel) -> None:
    """Drop the model's weights before the next model is loaded (the caller must hold no other reference)."""
    eval_model.model = None
    gc.collect()
    if eval_model.device.type == "cuda":
        torch.cuda.empty_cache()


def encode_question(prompt: str, tokenizer, image_id: int, image_tokens: int) -> list[int]:
    """Token ids of the llava_v1 evaluation prompt for ``prompt`` with the image expanded to ``image_tokens`` ids."""
    text = render_eval_prompt(prompt, has_image=True, template=EVAL_TEMPLATE)
    ids = tokenize_with_image(text, tokenizer, image_id)
    expanded_ids, _ = expand_image(ids, ids, image_id, image_tokens)
    return expanded_ids


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists to one length: (input_ids (B, T), attention_mask (B, T)), mask 1 on real tokens."""
    if not sequences or any(len(sequence) == 0 for sequence in sequences):
        raise ValueError("left_pad needs at least one sequence and no empty sequence")
    length = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)  # (B, T)
    for row, sequence in enumerate(sequences):
        input_ids[row, length - len(sequence):] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, length - len(sequence):] = 1
    return input_ids, attention_mask


def load_pixels(image_paths: Sequence[str | Path], image_size: int,
                max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Preprocessed images, (B, 3, image_size, image_size) float32; a file that cannot be used raises EvalImageError."""
    images = []
    for path in image_paths:
        try:
            image_bytes = Path(path).read_bytes()
            images.append(torch.from_numpy(preprocess_image(image_bytes, image_size=image_size, max_pixels=max_pixels)))
        except FileNotFoundError as error:
            raise EvalImageError(f"image {path} does not exist: re-create the evaluation set with data_prep "
                                 "bench") from error
        except ImageError as error:
            raise EvalImageError(f"image {path} cannot be used ({error}); fix or remove its question") from error
    return torch.stack(images)  # (B, 3, S, S)


def greedy_generation_config(tokenizer, max_new_tokens: int = MAX_NEW_TOKENS) -> GenerationConfig:
    """How ``eval run`` decodes (GeoChat's evaluation): greedy, one beam, stop at EOS, pad with unk. The export
    writes the same as the model's ``generation_config.json``, so ``model.generate`` defaults to it."""
    return GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=PAD_ID)


def decode_answer(new_token_ids: Sequence[int], tokenizer, eos_id: int) -> str:
    """Text of the generated ids up to (not including) the first EOS, special tokens skipped, stripped."""
    ids = list(new_token_ids)
    if eos_id in ids:
        ids = ids[:ids.index(eos_id)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


@torch.inference_mode()
def generate_answers(eval_model: EvalModel, prompts: Sequence[str], pixel_values: torch.Tensor,
                     max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Greedy answers to ``prompts`` (one image each, ``pixel_values`` (B, 3, S, S)), in one left-padded batch."""
    if len(prompts) != pixel_values.shape[0]:
        raise ValueError(f"{len(prompts)} prompts but {pixel_values.shape[0]} images")
    tokenizer = eval_model.tokenizer
    sequences = [encode_question(prompt, tokenizer, eval_model.image_token_id, eval_model.num_image_tokens)
                 for prompt in prompts]
    return generate_from_ids(eval_model, sequences, pixel_values, max_new_tokens)


@torch.inference_mode()
def generate_from_ids(eval_model: EvalModel, sequences: Sequence[Sequence[int]], pixel_values: torch.Tensor,
                      max_new_tokens: int = MAX_NEW_TOKENS, suppress_token_ids: Sequence[int] = ()) -> list[str]:
    """Greedy answers to already tokenized prompts (image blocks expanded), one image each, in one left-padded
    batch (``eval label`` renders whole conversations with the training template and comes in here, suppressing
    the ``<image>`` id: an answer holding it could not be trained on)."""
    tokenizer = eval_model.tokenizer
    generation_config = greedy_generation_config(tokenizer, max_new_tokens)
    if suppress_token_ids:
        generation_config.suppress_tokens = list(suppress_token_ids)
    input_ids, attention_mask = left_pad(sequences)  # (B, T), (B, T)
    output_ids = eval_model.model.generate(
        input_ids=input_ids.to(eval_model.device), attention_mask=attention_mask.to(eval_model.device),
        pixel_values=pixel_values.to(eval_model.device, eval_model.dtype),
        generation_config=generation_config)  # (B, T + N)
    new_ids = output_ids[:, input_ids.shape[1]:].tolist()  # (B, N): generate returns prompt + new tokens
    return [decode_answer(row, tokenizer, tokenizer.eos_token_id) for row in new_ids]
