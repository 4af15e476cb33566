"""Parameter counts, analytic FLOPs (cross-checked with FlopCounterMode) and generation timing on tiny LLaVA models."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from kd_pipeline.eval.efficiency import (
    PAPER_TEXT_TOKENS,
    count_parameters,
    efficiency_metrics,
    forward_flops,
    geochat_config,
    measure_generation,
)

IMAGE_TOKEN = 127
IMAGE_SIZE, PATCH = 56, 14
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # 16, CLS dropped by the "default" strategy


def tiny_config(kv_heads: int = 2) -> LlavaConfig:
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32)
    text = LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=kv_heads, vocab_size=128, max_position_embeddings=256)
    return LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu",
                       image_token_index=IMAGE_TOKEN, image_seq_length=IMAGE_TOKENS)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return LlavaForConditionalGeneration._from_config(tiny_config(), attn_implementation="eager").eval()


def tiny_inputs(text_tokens: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.cat([torch.full((1, IMAGE_TOKENS), IMAGE_TOKEN),
                           torch.randint(3, 100, (1, text_tokens), generator=generator)], dim=1)  # (1, L)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "pixel_values": torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)}


def test_parameter_counts_match_the_modules(tiny_model):
    counts = count_parameters(tiny_model)
    inner = tiny_model.model
    assert counts.vision_tower == sum(p.numel() for p in inner.vision_tower.parameters())
    assert counts.projector == sum(p.numel() for p in inner.multi_modal_projector.parameters())
    assert counts.language_model == (sum(p.numel() for p in inner.language_model.parameters())
                                     + tiny_model.lm_head.weight.numel())
    assert counts.vision_position_table == (IMAGE_TOKENS + 1) * 32
    assert counts.total == sum(p.numel() for p in tiny_model.parameters()) and counts.other == 0
    assert counts.paper == counts.language_model + counts.projector + counts.vision_position_table


def test_parameter_counts_work_on_the_meta_device():
    config = tiny_config()
    with torch.device("meta"):
        meta_model = LlavaForConditionalGeneration(config)
    real_model = LlavaForConditionalGeneration(config)
    assert count_parameters(meta_model) == count_parameters(real_model)
    with pytest.raises(ValueError, match="LLaVA-style"):
        count_parameters(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("text_tokens", [1, 9])
def test_analytic_matmul_flops_equal_flop_counter(tiny_model, text_tokens):
    analytic = forward_flops(tiny_model.config, text_tokens=text_tokens, num_images=1)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        tiny_model(**tiny_inputs(text_tokens))
    assert counter.get_total_flops() == analytic.matmul_only
    assert analytic.sequence_length == IMAGE_TOKENS + text_tokens
    assert 0 < analytic.elementwise < analytic.matmul_only
    assert analytic.total == analytic.matmul_only + analytic.elementwise


def test_text_only_forward_has_no_vision_or_projector_flops(tiny_model):
    analytic = forward_flops(tiny_model.config, text_tokens=12, num_images=0)
    assert analytic.vision_matmul == analytic.vision_attention == analytic.projector_matmul == 0
    input_ids = torch.randint(3, 100, (1, 12))  # (1, T)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        tiny_model(input_ids=input_ids)
    assert counter.get_total_flops() == analytic.matmul_only
    last_only = forward_flops(tiny_model.config, text_tokens=12, num_images=0, logits_positions=1)
    assert analytic.lm_head_matmul - last_only.lm_head_matmul == 2 * 11 * 48 * 128


def test_attention_term_is_quadratic_in_sequence_length():
    config = tiny_config()
    short, long = forward_flops(config, 10, 0), forward_flops(config, 20, 0)
    assert long.llm_attention == 4 * short.llm_attention
    assert long.llm_matmul == 2 * short.llm_matmul
    with pytest.raises(ValueError):
        forward_flops(config, 0, 0)


def test_geochat_shapes_reproduce_table_8():
    for size, paper_params_m, paper_flops_g in (("7b", 6760.72, 6904.53), ("13b", 13048.66, 13377.05)):
        config = geochat_config(size)
        with torch.device("meta"):
            model = LlavaForConditionalGeneration(config)
        metrics = efficiency_metrics(model, config, text_tokens=64)
        assert round(metrics["params_paper"] / 1e6, 2) == paper_params_m
        assert metrics["flops_paper_convention"] / 1e9 == pytest.approx(paper_flops_g, rel=5e-4)
        assert metrics["flops_forward_parts"]["image_tokens"] == 1296
        assert metrics["flops_forward_matmul"] > 2.5 * metrics["flops_paper_convention"]
    assert PAPER_TEXT_TOKENS == 512


def test_measure_generation_produces_the_requested_tokens(tiny_model):
    timing = measure_generation(tiny_model, tiny_inputs(4), new_tokens=3, warmup=1, repeats=2)
    assert (timing.prompt_tokens, timing.new_tokens, timing.repeats) == (IMAGE_TOKENS + 4, 3, 2)
    assert timing.latency_s > 0 and timing.tokens_per_s == pytest.approx(3 / timing.latency_s)
    with pytest.raises(ValueError):
        measure_generation(tiny_model, tiny_inputs(4), new_tokens=0)
