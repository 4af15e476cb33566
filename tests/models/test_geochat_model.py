"""Building, loading and running the GeoChat model: config facts, z(x), freezing, LoRA placement, attention choice."""

import ast
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kd_pipeline
from kd_pipeline.config import ModelConfig
from kd_pipeline.models import (ModelError, build_model, forward_with_features, load_model, position_table,
                                projector_features, select_attn_implementation, unwrap_model)
from kd_pipeline.models.vision import interpolate_position_table

VOCAB, IMAGE_ID = 60, 59
TINY = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, vision_hidden_size=16,
                   vision_layers=2, vision_heads=2, image_size=28, patch_size=14)  # 2x2 grid: 4 image tokens


def batch(generator_seed: int = 0):
    generator = torch.Generator().manual_seed(generator_seed)
    text = torch.randint(3, IMAGE_ID, (2, 10), generator=generator)
    input_ids = torch.cat([text[:, :3], torch.full((2, 4), IMAGE_ID), text[:, 3:]], dim=1)  # (2, 14)
    pixel_values = torch.randn(2, 3, 28, 28, generator=generator)
    return input_ids, pixel_values, torch.ones_like(input_ids)


def hand_projector_features(model, pixel_values):
    """CLIP layer -2 without CLS, then Linear-GELU-Linear written out with the raw weights."""
    llava = unwrap_model(model)
    hidden = llava.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
    projector = llava.model.multi_modal_projector
    mid = F.gelu(F.linear(hidden, projector.linear_1.weight, projector.linear_1.bias))
    return F.linear(mid, projector.linear_2.weight, projector.linear_2.bias)


def test_config_matches_geochat_facts():
    model = build_model(TINY, vocab_size=VOCAB, image_token_id=IMAGE_ID)
    config = model.config
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "default")
    assert config.projector_hidden_act == "gelu" and config.multimodal_projector_bias
    assert config.text_config.rms_norm_eps == 1e-5 and config.text_config.max_position_embeddings == 4096
    assert not config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert config.image_token_id == IMAGE_ID and config.image_seq_length == 4
    assert model.get_input_embeddings().weight.shape == (VOCAB, 32)


def test_forward_exposes_projector_features_with_gradient():
    torch.manual_seed(0)
    model = build_model(TINY, vocab_size=VOCAB, image_token_id=IMAGE_ID)
    input_ids, pixel_values, attention_mask = batch()
    output, features = forward_with_features(model, input_ids, pixel_values, attention_mask, labels=input_ids)
    assert output.logits.shape == (2, 14, VOCAB) and output.loss is not None
    assert features.shape == (2, 4, 32)
    torch.testing.assert_close(features, hand_projector_features(model, pixel_values))
    torch.testing.assert_close(projector_features(model, pixel_values), features)
    features.pow(2).sum().backward()
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.model.vision_tower.parameters())


def test_forward_without_image_returns_no_features():
    model = build_model(TINY, vocab_size=VOCAB, image_token_id=IMAGE_ID)
    output, features = forward_with_features(model, torch.randint(3, 50, (1, 5)), None, torch.ones(1, 5).long())
    assert features is None and output.logits.shape == (1, 5, VOCAB)


def test_full_finetuning_freezes_the_tower_and_follows_train_projector():
    model = build_model(TINY, vocab_size=VOCAB, image_token_id=IMAGE_ID)
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
    assert not position_table(model.model.vision_tower).requires_grad
    assert all(p.requires_grad for p in model.model.language_model.parameters())
    assert model.lm_head.weight.requires_grad
    assert all(p.requires_grad for p in model.model.multi_modal_projector.parameters())
    frozen = build_model(replace(TINY, train_projector=False), vocab_size=VOCAB,
                         image_token_id=IMAGE_ID)
    assert not any(p.requires_grad for p in frozen.model.multi_modal_projector.parameters())


def test_frozen_teacher_has_no_trainable_parameters_and_no_adapters():
    teacher = build_model(replace(TINY, lora=True), vocab_size=VOCAB, image_token_id=IMAGE_ID, frozen=True)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert not any("lora_" in name for name, _ in teacher.named_parameters())


def test_lora_adapts_only_llm_projections_and_features_survive_peft_wrapping():
    torch.manual_seed(0)
    lora_cfg = replace(TINY, lora=True, lora_r=4)
    model = build_model(lora_cfg, vocab_size=VOCAB, image_token_id=IMAGE_ID)
    names = [name for name, _ in model.named_parameters() if "lora_" in name]
    assert names and all(".language_model.layers." in name for name in names)
    adapted = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in names}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(names) | {name for name, _ in model.named_parameters() if "multi_modal_projector" in name}
    input_ids, pixel_values, attention_mask = batch()
    output, features = forward_with_features(model, input_ids, pixel_values, attention_mask)
    torch.testing.assert_close(features, hand_projector_features(model, pixel_values))
    torch.testing.assert_close(projector_features(model, pixel_values), features)
    # lora_B starts at zero, so the wrapped model computes what the base model computes.
    with model.disable_adapter():
        base_logits = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask).logits
    torch.testing.assert_close(output.logits, base_logits)


def test_gradient_checkpointing_trains():
    gc_cfg = replace(TINY, gradient_checkpointing=True)
    model = build_model(gc_cfg, vocab_size=VOCAB, image_token_id=IMAGE_ID).train()
    assert model.model.language_model.gradient_checkpointing
    input_ids, pixel_values, attention_mask = batch()
    output, _ = forward_with_features(model, input_ids, pixel_values, attention_mask, labels=input_ids)
    output.loss.backward()
    assert model.model.language_model.layers[0].self_attn.q_proj.weight.grad is not None


def test_attention_backend_auto_is_sdpa_without_flash_attn():
    assert select_attn_implementation("auto") == "sdpa"
    assert select_attn_implementation("eager") == "eager"
    with pytest.raises(ModelError, match="flash-attn"):
        select_attn_implementation("flash_attention_2")


def test_flash_attn_is_never_imported_by_our_modules():
    # Static check: flash-attn cannot be installed on CPU machines, so an import of it would break every CPU run.
    package = Path(kd_pipeline.__file__).parent
    for source in [*sorted((package / "models").glob("*.py")), package / "convert.py", package / "convert_keys.py"]:
        for node in ast.walk(ast.parse(source.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(name.split(".")[0] == "flash_attn" for name in names), f"{source} imports flash_attn"


def test_load_model_interpolates_a_tower_saved_at_another_size(tmp_path):
    torch.manual_seed(0)
    saved = build_model(TINY, vocab_size=VOCAB, image_token_id=IMAGE_ID)
    saved.save_pretrained(tmp_path / "ckpt")
    original_table = position_table(saved.model.vision_tower).detach().clone()
    bigger = replace(TINY, path=str(tmp_path / "ckpt"), image_size=42)
    model = load_model(bigger, vocab_size=VOCAB, image_token_id=IMAGE_ID)
    table = position_table(model.model.vision_tower)
    assert table.shape == (10, 16) and not table.requires_grad
    torch.testing.assert_close(table, interpolate_position_table(original_table, 3))
    assert model.config.image_seq_length == 9 and model.config.vision_config.image_size == 42
    torch.testing.assert_close(model.lm_head.weight, saved.lm_head.weight)
    input_ids = torch.cat([torch.tensor([[1, 5]]), torch.full((1, 9), IMAGE_ID)], dim=1)
    _, features = forward_with_features(model, input_ids, torch.randn(1, 3, 42, 42), torch.ones_like(input_ids))
    assert features.shape == (1, 9, 32)


def test_load_model_errors_name_the_problem(tmp_path):
    missing = replace(TINY, path=str(tmp_path / "nowhere"))
    with pytest.raises(ModelError, match="nowhere.*config.json"):
        load_model(missing)
    build_model(TINY, vocab_size=VOCAB, image_token_id=IMAGE_ID).save_pretrained(tmp_path / "ckpt")
    present = replace(TINY, path=str(tmp_path / "ckpt"))
    with pytest.raises(ModelError, match="60 embedding rows but the tokenizer has 61"):
        load_model(present, vocab_size=61)
    with pytest.raises(ModelError, match="image token id 59"):
        load_model(present, image_token_id=3)
