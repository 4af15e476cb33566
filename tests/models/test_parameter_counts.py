"""Parameter counts: the paper's Table 8 from 7B/13B-shaped meta models, parts, and LoRA's r*(d_in + d_out)."""

import logging
from dataclasses import replace

import pytest
import torch

from kd_pipeline.config import ModelConfig
from kd_pipeline.models import apply_lora, build_model, count_parameters, meta_model, millions

log = logging.getLogger(__name__)


def llama_parameters(vocab: int, hidden: int, layers: int, intermediate: int) -> int:
    """Embedding + per layer (q, k, v, o; gate, up, down; two RMSNorms) + final norm + untied lm_head."""
    per_layer = 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden
    return vocab * hidden + layers * per_layer + hidden + vocab * hidden


def clip_l14_tower_without_table() -> int:
    hidden, mlp, layers, patch = 1024, 4096, 24, 14
    embeddings = hidden + 3 * patch * patch * hidden  # class embedding + bias-free patch conv
    per_layer = 4 * (hidden * hidden + hidden) + (hidden * mlp + mlp) + (mlp * hidden + hidden) + 2 * 2 * hidden
    return embeddings + 2 * hidden + layers * per_layer + 2 * hidden  # pre- and post-layernorm


@pytest.mark.parametrize("arch, hidden, layers, intermediate, paper_millions", [
    ("geochat-7b", 4096, 32, 11008, 6760.72),
    ("geochat-13b", 5120, 40, 13824, 13048.66),
])
def test_meta_models_reproduce_table_8(arch, hidden, layers, intermediate, paper_millions):
    counts = count_parameters(meta_model(arch))
    projector = (1024 * hidden + hidden) + (hidden * hidden + hidden)
    table = 1297 * 1024
    # GeoChat's 32000-row vocabulary is what makes the paper's number exact.
    expected_paper = llama_parameters(32000, hidden, layers, intermediate) + projector + table
    assert counts["paper"] == expected_paper
    assert millions(counts["paper"]) == paper_millions
    # Our extra <image> row pair (embedding + lm_head) would break the match if it were counted.
    assert counts["image_token_rows"] == 2 * hidden
    assert millions(counts["paper"] + counts["image_token_rows"]) != paper_millions
    assert counts["llm"] == llama_parameters(32001, hidden, layers, intermediate)
    assert counts["projector"] == projector and counts["position_table"] == table
    assert counts["vision_tower"] == clip_l14_tower_without_table()
    assert counts["total"] == counts["paper"] + counts["image_token_rows"] + counts["vision_tower"]
    assert counts["lora"] == counts["other"] == 0
    log.info("%s: paper %.2f M, total with the whole CLIP tower %.2f M", arch, millions(counts["paper"]),
             millions(counts["total"]))


def test_counts_match_the_modules_of_a_real_model():
    model = build_model(ModelConfig(), vocab_size=70, image_token_id=69)
    counts = count_parameters(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["vision_tower"] + counts["position_table"] == sum(
        p.numel() for p in model.model.vision_tower.parameters())
    assert counts["trainable"] == counts["total"] - counts["vision_tower"] - counts["position_table"]


def lora_formula(config, rank: int) -> int:
    hidden, intermediate = config.text_config.hidden_size, config.text_config.intermediate_size
    shapes = [(hidden, hidden)] * 4 + [(hidden, intermediate)] * 2 + [(intermediate, hidden)]  # (d_in, d_out)
    return config.text_config.num_hidden_layers * sum(rank * (d_in + d_out) for d_in, d_out in shapes)


@pytest.mark.parametrize("rank", [4, 8])
def test_lora_parameters_follow_r_times_d_in_plus_d_out(rank):
    model_cfg = replace(ModelConfig(hidden_size=48, intermediate_size=80, num_layers=3), lora=True, lora_r=rank)
    model = build_model(model_cfg, vocab_size=70, image_token_id=69)
    counts = count_parameters(model)
    assert counts["lora"] == lora_formula(model.config, rank)
    assert counts["trainable"] == counts["lora"] + counts["projector"]
    assert counts["trainable"] == model.get_nb_trainable_parameters()[0]


def test_lora_count_on_the_7b_shape():
    model = meta_model("geochat-7b")
    with torch.device("meta"):  # peft would otherwise initialise 160 M adapter weights on the CPU
        peft_model = apply_lora(model, ModelConfig(lora=True, lora_r=64))
    counts = count_parameters(peft_model)
    assert counts["lora"] == lora_formula(model.config, 64) == 159_907_840
    assert next(p for n, p in peft_model.named_parameters() if "lora_A" in n).device == torch.device("meta")


def test_counts_see_through_engine_wrappers_and_zero3_partitions():
    model = build_model(ModelConfig(), vocab_size=70, image_token_id=69)
    expected = count_parameters(model)

    class EngineLike(torch.nn.Module):  # DeepSpeedEngine and DDP expose the model as .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert count_parameters(EngineLike(model)) == expected
    # ZeRO-3 leaves an empty local tensor and records the full size in ds_numel / ds_shape.
    for parameter in model.parameters():
        parameter.ds_numel, parameter.ds_shape = parameter.numel(), parameter.shape
        parameter.data = torch.empty(0)
    assert count_parameters(model) == expected
