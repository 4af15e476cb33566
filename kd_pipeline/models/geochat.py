"""GeoChat (LLaVA-1.5) as a transformers ``LlavaForConditionalGeneration``: build, load, and read z(x).

Model = CLIP ViT tower (frozen, features of layer -2 without CLS) -> mlp2x_gelu projector (Linear, GELU, Linear;
z(x) of paper eq. 4) -> LLaMA/Vicuna decoder with its own lm_head (not tied).

Vocabulary rows. GeoChat's LLM has the 32000 rows of LLaMA's SentencePiece vocabulary; its ``<image>`` is a
placeholder id (-200) that never reaches the embedding table. transformers' LLaVA instead looks the image token up
in the table before scattering the image features over it, so the token needs a real row. We follow the kd_pipeline
tokenizer (``<image>`` appended after the SentencePiece vocabulary) and LLaVA-HF's converter: **32001 rows, <image>
at id 32000**, no padding to a multiple of 64 (LLaVA-HF's 32064 only adds unused rows; such a padded checkpoint
loads too, <image> then sits at the first row without a token: ``kd_pipeline.convert``). ``count_parameters``
reports that one row pair separately, which is why the paper's Table 8 counts (32000 rows) come out exactly.

Order of the common steps (``prepare_model``): feature selection -> freeze the tower -> projector trainability ->
gradient checkpointing of the LLM -> LoRA (peft freezes the base, so the projector is re-enabled after it) or full
LLM training. The attention backend is chosen before the weights are created.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
from transformers.utils import is_flash_attn_2_available

from kd_pipeline.config import ModelConfig
from kd_pipeline.data.packing import forward_batch
from kd_pipeline.errors import UserError
from kd_pipeline.models.layout import llava_layout, unwrap_model
from kd_pipeline.models.lora import apply_lora
from kd_pipeline.models.vision import num_image_tokens, resize_vision_tower

log = logging.getLogger(__name__)

GEOCHAT_TEXT_VOCAB = 32000
"""Rows of LLaMA/Vicuna's SentencePiece vocabulary; the `<image>` row is appended after them (id 32000)."""
GEOCHAT_IMAGE_SIZE = 504
"""GeoChat's input resolution (a 36x36 patch grid: 1296 image tokens)."""


@dataclass(frozen=True)
class LlmShape:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int


LLM_PRESETS = {
    "geochat-7b": LlmShape(hidden_size=4096, num_layers=32, num_heads=32, intermediate_size=11008),  # Vicuna-7B v1.5
    "geochat-13b": LlmShape(hidden_size=5120, num_layers=40, num_heads=40, intermediate_size=13824),  # Vicuna-13B v1.5
}

CLIP_VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)
"""openai/clip-vit-large-patch14-336's vision config (its image_size is replaced by the run's)."""


class ModelError(UserError, ValueError):
    """A model that cannot be built or loaded as configured, worded with the setting or path to fix."""


# ----------------------------------------------------------------------------------------------------- configs


def llava_config(model_cfg: ModelConfig, *, vocab_size: int, image_token_id: int) -> LlavaConfig:
    """The LlavaConfig for ``model_cfg.arch``: a GeoChat preset or the tiny sizes of ``model_cfg``."""
    if not 0 <= image_token_id < vocab_size:
        raise ModelError(f"image_token_id {image_token_id} must be a row of the {vocab_size}-row vocabulary "
                         "(transformers' LLaVA embeds the image token before replacing it)")
    if model_cfg.arch in LLM_PRESETS:
        shape = LLM_PRESETS[model_cfg.arch]
        if model_cfg.image_size != GEOCHAT_IMAGE_SIZE or model_cfg.patch_size != CLIP_VIT_L14["patch_size"]:
            log.warning("%s built at image_size=%d patch_size=%d; GeoChat runs at %d px with patch 14",
                        model_cfg.arch, model_cfg.image_size, model_cfg.patch_size, GEOCHAT_IMAGE_SIZE)
        vision = CLIPVisionConfig(**{**CLIP_VIT_L14, "patch_size": model_cfg.patch_size,
                                     "image_size": model_cfg.image_size})
    elif model_cfg.arch == "tiny":
        shape = LlmShape(model_cfg.hidden_size, model_cfg.num_layers, model_cfg.num_heads, model_cfg.intermediate_size)
        vision = CLIPVisionConfig(hidden_size=model_cfg.vision_hidden_size,
                                  intermediate_size=4 * model_cfg.vision_hidden_size,
                                  num_hidden_layers=model_cfg.vision_layers,
                                  num_attention_heads=model_cfg.vision_heads, patch_size=model_cfg.patch_size,
                                  image_size=model_cfg.image_size, projection_dim=model_cfg.vision_hidden_size,
                                  hidden_act="quick_gelu", layer_norm_eps=1e-5)
    else:
        raise ModelError(f"unknown arch {model_cfg.arch!r} (tiny, geochat-7b or geochat-13b)")
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
                       num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
                       num_key_value_heads=shape.num_heads, hidden_act="silu", rms_norm_eps=1e-5,
                       max_position_embeddings=4096, tie_word_embeddings=False,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                       image_seq_length=num_image_tokens(model_cfg), projector_hidden_act="gelu",
                       multimodal_projector_bias=True, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", tie_word_embeddings=False)


def llm_hidden_size(model_cfg: ModelConfig) -> int:
    """The LLM hidden size of ``model_cfg.arch`` (a preset's, or the tiny ``hidden_size``) without building a config."""
    if model_cfg.arch in LLM_PRESETS:
        return LLM_PRESETS[model_cfg.arch].hidden_size
    if model_cfg.arch == "tiny":
        return model_cfg.hidden_size
    raise ModelError(f"unknown arch {model_cfg.arch!r} (tiny, geochat-7b or geochat-13b)")


def select_attn_implementation(requested: str) -> str:
    """``auto`` -> flash_attention_2 when flash-attn and CUDA are present, else sdpa. Never imports flash-attn."""
    if requested == "auto":
        chosen = "flash_attention_2" if is_flash_attn_2_available() else "sdpa"
    elif requested == "flash_attention_2" and not is_flash_attn_2_available():
        raise ModelError("attn_implementation=flash_attention_2 needs the flash-attn package (>= 2.3.3) and CUDA; "
                         "use auto or sdpa")
    else:
        chosen = requested
    log.info("attention backend: %s (requested %s)", chosen, requested)
    return chosen


# ----------------------------------------------------------------------------------------------------- build / load


def build_model(model_cfg: ModelConfig, *, vocab_size: int, image_token_id: int, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None, frozen: bool = False) -> nn.Module:
    """A randomly initialised model of ``model_cfg.arch`` at ``model_cfg.image_size`` (no interpolation needed),
    prepared by ``prepare_model``. Returns a PeftModel when ``model_cfg.lora`` (and not ``frozen``)."""
    config = llava_config(model_cfg, vocab_size=vocab_size, image_token_id=image_token_id)
    with torch.device(device or "cpu"):
        model = LlavaForConditionalGeneration._from_config(
            config, attn_implementation=select_attn_implementation(model_cfg.attn_implementation), dtype=dtype)
    return prepare_model(model, model_cfg, frozen=frozen)


def load_model(model_cfg: ModelConfig, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
               vocab_size: int | None = None, image_token_id: int | None = None, frozen: bool = False) -> nn.Module:
    """Load ``model_cfg.path`` (a transformers LLaVA directory) offline and prepare it for training.

    ``vocab_size`` / ``image_token_id``, when given (from the tokenizer), must agree with the checkpoint (more rows
than tokens is a padded vocabulary, e.g. LLaVA-HF's 32064: accepted, the extra rows are never fed). A tower
    stored at another resolution gets GeoChat's position-table interpolation to ``model_cfg.image_size``.
    """
    path = Path(model_cfg.path)
    if not (path / "config.json").is_file():
        raise ModelError(f"model path {path} has no config.json: give a transformers LLaVA directory "
                         "(python -m kd_pipeline.convert geochat-to-hf makes one from a GeoChat checkpoint)")
    model = LlavaForConditionalGeneration.from_pretrained(
        str(path), local_files_only=True, dtype=dtype,
        attn_implementation=select_attn_implementation(model_cfg.attn_implementation))
    if device is not None:
        model = model.to(device)
    rows = model.get_input_embeddings().num_embeddings  # not weight.shape: 0 under ZeRO-3 partitioning
    if vocab_size is not None and vocab_size > rows:
        raise ModelError(f"{path} has {rows} embedding rows but the tokenizer has {vocab_size} tokens: "
                         "use the tokenizer saved with this checkpoint")
    if vocab_size is not None and vocab_size < rows:
        log.info("%s: %d embedding rows for %d tokens: the %d rows after the tokenizer's are padding (no token "
                 "reaches them)", path, rows, vocab_size, rows - vocab_size)
    if image_token_id is not None and image_token_id != model.config.image_token_id:
        raise ModelError(f"{path} uses image token id {model.config.image_token_id} but the tokenizer's <image> is "
                         f"{image_token_id}: use the tokenizer saved with this checkpoint")
    stored_size = model.config.vision_config.image_size
    if stored_size != model_cfg.image_size and any(hasattr(p, "ds_id") for p in model.parameters()):
        # Re-creating the position table needs the full table, which ZeRO-3 has partitioned at load.
        raise ModelError(f"{path} stores its vision tower at {stored_size} px but {model_cfg.image_size} px was asked "
                         "for: convert it once on CPU first (python -m kd_pipeline.convert geochat-to-hf "
                         f"--image-size {model_cfg.image_size}, or load and save_pretrained it at that size)")
    if stored_size != model_cfg.image_size and resize_vision_tower(
            model.get_submodule(llava_layout(model).vision_tower), model_cfg.image_size):
        model.config.vision_config.image_size = model_cfg.image_size
        model.config.image_seq_length = num_image_tokens(model_cfg)
    return prepare_model(model, model_cfg, frozen=frozen)


def create_model(model_cfg: ModelConfig, *, vocab_size: int, image_token_id: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 frozen: bool = False) -> nn.Module:
    """``load_model`` when ``model_cfg.path`` is set, else ``build_model``: the one call a recipe needs
    (``frozen=True`` for the teacher)."""
    if model_cfg.path:
        return load_model(model_cfg, dtype=dtype, device=device, vocab_size=vocab_size, image_token_id=image_token_id,
                          frozen=frozen)
    return build_model(model_cfg, vocab_size=vocab_size, image_token_id=image_token_id, dtype=dtype, device=device,
                       frozen=frozen)


def meta_model(arch: str, *, image_size: int = GEOCHAT_IMAGE_SIZE, vocab_size: int = GEOCHAT_TEXT_VOCAB + 1,
               image_token_id: int = GEOCHAT_TEXT_VOCAB) -> LlavaForConditionalGeneration:
    """A GeoChat-shaped model on the meta device (no memory, well under a second): for counting and FLOPs."""
    model_cfg = ModelConfig(arch=arch, image_size=image_size, patch_size=CLIP_VIT_L14["patch_size"])
    config = llava_config(model_cfg, vocab_size=vocab_size, image_token_id=image_token_id)
    with torch.device("meta"):
        return LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa")


# ----------------------------------------------------------------------------------------------------- common steps


def prepare_model(model: LlavaForConditionalGeneration, model_cfg: ModelConfig, *, frozen: bool = False) -> nn.Module:
    """GeoChat's training setup on a freshly built or loaded model (see the module docstring for the order).

    ``frozen=True`` (a teacher): every parameter frozen and eval mode; LoRA, projector training and gradient
    checkpointing settings are ignored.
    """
    config = model.config
    if config.vision_feature_layer != -2 or config.vision_feature_select_strategy != "default":
        log.warning("checkpoint selects vision layer %s / %s; using GeoChat's -2 / default (CLS dropped)",
                    config.vision_feature_layer, config.vision_feature_select_strategy)
        config.vision_feature_layer, config.vision_feature_select_strategy = -2, "default"
    if frozen:
        model.requires_grad_(False)
        return model.eval()
    parts = llava_layout(model)
    language_model = model.get_submodule(parts.language_model)
    projector = model.get_submodule(parts.projector)
    model.get_submodule(parts.vision_tower).requires_grad_(False)
    projector.requires_grad_(model_cfg.train_projector)
    if model_cfg.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad, so frozen embeddings (LoRA) are fine.
        language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if model_cfg.lora:
        peft_model = apply_lora(model, model_cfg)
        projector.requires_grad_(model_cfg.train_projector)
        return peft_model
    language_model.requires_grad_(True)
    model.get_submodule(parts.lm_head).requires_grad_(True)
    return model


# ----------------------------------------------------------------------------------------------------- z(x)


def _stack_image_features(image_outputs) -> torch.Tensor:
    """transformers 5.x: ``image_outputs.pooler_output`` is a list of per-image projector outputs (N_img, H)."""
    features = getattr(image_outputs, "pooler_output", None)
    if features is None:
        raise ModelError("the LLaVA output carries no image_outputs.pooler_output (projector features); "
                         "this transformers version is not supported")
    return torch.stack(list(features)) if isinstance(features, (list, tuple)) else features  # (B_img, N_img, H)


def projector_features(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """z(x) of paper eq. 4: the projector outputs for ``pixel_values`` (B, 3, S, S) -> (B, N_img, H)."""
    llava = unwrap_model(model)
    image_outputs = llava.get_image_features(pixel_values=pixel_values, return_dict=True)
    return _stack_image_features(image_outputs)


def hidden_and_features(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward through vision tower, projector and LLM, without the LM head (the losses apply it in chunks).

    ``batch`` holds ``input_ids``, ``attention_mask``, optional ``position_ids`` and ``pixel_values``, padded or
    packed (``data.packing.forward_batch`` keeps packed samples apart). Returns the
    final hidden states ``(B, L, H)`` and z(x) ``(N_img, T_img, H)``. A text-only batch (no or zero-row
    ``pixel_values``) still runs the tower and projector on one blank image and returns its features with N_img = 0
    rows selected: under ZeRO-3 every rank must gather the same modules in the same order, and a rank whose batch
    happens to have no image would otherwise skip the tower's collectives and hang its peers (LLaVA runs a dummy
    image for the same reason). The zero-row slice keeps the graph connected, so the projector gets exact zero
    gradients.
    """
    llava = unwrap_model(model)
    pixel_values = batch.get("pixel_values")
    if pixel_values is not None and pixel_values.shape[0] == 0:
        pixel_values = None
    output = forward_batch(llava.model, batch, pixel_values=pixel_values)  # padded or packed (data/packing.py)
    if output.image_outputs is not None:
        return output.last_hidden_state, _stack_image_features(output.image_outputs)
    size = llava.config.vision_config.image_size
    blank = output.last_hidden_state.new_zeros(1, 3, size, size)  # (1, 3, S, S)
    return output.last_hidden_state, projector_features(llava, blank)[:0]  # (0, T_img, H)


def forward_with_features(model: nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                          attention_mask: torch.Tensor, labels: torch.Tensor | None = None, **forward_kwargs):
    """One forward giving the logits and z(x) together: ``(output, image_features)``.

    ``model`` may be the LLaVA model, its peft wrapper or a DeepSpeed engine around either (it is only called).
    In transformers 5.24 the projector outputs are ``output.image_outputs.pooler_output`` (one (N_img, H) tensor
    per image, still attached to the graph); ``output.image_hidden_states`` is a deprecated alias of the same.
    ``image_features`` is (B_img, N_img, H), or None without ``pixel_values``.
    """
    output = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, labels=labels,
                   **forward_kwargs)
    if pixel_values is None:
        return output, None
    return output, _stack_image_features(output.image_outputs)
