"""GeoChat models in transformers: build/load (geochat), position tables (vision), LoRA (lora), counts (counting)."""

from kd_pipeline.models.counting import count_parameters, millions
from kd_pipeline.models.geochat import (GEOCHAT_IMAGE_SIZE, GEOCHAT_TEXT_VOCAB, ModelError, build_model, create_model,
                                        forward_with_features, hidden_and_features, llava_config, llm_hidden_size,
                                        load_model, meta_model, prepare_model, projector_features,
                                        select_attn_implementation)
from kd_pipeline.models.layout import LlavaLayout, llava_layout, unwrap_model
from kd_pipeline.models.lora import apply_lora, lora_target_regex
from kd_pipeline.models.vision import interpolate_position_table, num_image_tokens, position_table, resize_vision_tower

__all__ = [
    "GEOCHAT_IMAGE_SIZE", "GEOCHAT_TEXT_VOCAB", "LlavaLayout", "ModelError", "apply_lora", "build_model",
    "count_parameters", "create_model", "forward_with_features", "hidden_and_features", "interpolate_position_table",
    "llava_config", "llava_layout", "llm_hidden_size", "load_model", "lora_target_regex", "meta_model", "millions", "num_image_tokens",
    "position_table", "prepare_model", "projector_features", "resize_vision_tower", "select_attn_implementation",
    "unwrap_model",
]
