"""Toy models for the sampler tests: a bigram stub with the causal-LM call interface and tiny random Llava/Llama."""

import math
from statistics import NormalDist
from types import SimpleNamespace

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration


class BigramStub(torch.nn.Module):
    """Next-token logits depend only on the last input token: logits = table[last_token].

    Speaks the interface sample_mixed uses (input_ids, attention_mask, position_ids, cache, use_cache,
    logits_to_keep, pixel_values) and records how each call looked, so tests can check what the sampler fed it.
    """

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table  # (V_prev, V) logits of the next token given the previous one
        self.calls: list[dict] = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None,
                logits_to_keep=0, pixel_values=None):
        self.calls.append({
            "input_length": input_ids.shape[1],
            "mask_length": attention_mask.shape[1],
            "had_cache": cache is not None,
            "had_pixels": pixel_values is not None,
            "position_ids": position_ids.clone(),
        })
        logits = self.table[input_ids[:, -1]][:, None, :]  # (B, 1, V)
        next_cache = None
        if use_cache:
            next_cache = SimpleNamespace(length=(cache.length if cache is not None else 0) + input_ids.shape[1])
        return SimpleNamespace(logits=logits, cache=next_cache)


VOCAB = 24
IMAGE_TOKEN = 23
EOS = 2
PAD = 0
IMAGE_SIZE = 28  # 2 x 2 patches of 14 px: 4 image tokens per prompt


def _build_llava(hidden_size: int, seed: int, *, eos_bias: float = 0.0, vocab_size: int = VOCAB):
    """Tiny random Llava; eos_bias adds a constant to the EOS logit so rows stop at varied times."""
    torch.manual_seed(seed)
    vision_config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=IMAGE_SIZE, patch_size=14, projection_dim=16)
    text_config = LlamaConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                              max_position_embeddings=128)
    config = LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_id=IMAGE_TOKEN,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config).eval()
    if eos_bias:
        biased_head = torch.nn.Linear(hidden_size, vocab_size, bias=True)
        biased_head.weight.data.copy_(model.lm_head.weight.data)
        biased_head.bias.data.zero_()
        biased_head.bias.data[EOS] = eos_bias
        model.lm_head = biased_head
    return model


def _build_llama(hidden_size: int, seed: int):
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def _image_prompts() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three left-padded prompts of different lengths, each with its 4 image placeholders, and their images."""
    rows = [[1, IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN, 5, 6],
            [1, IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN, 7, 8, 9, 10],
            [1, IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN]]
    width = max(len(row) for row in rows)
    input_ids = torch.tensor([[PAD] * (width - len(row)) + row for row in rows])  # (3, P)
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])  # (3, P)
    pixel_values = torch.randn(len(rows), 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(7))
    return input_ids, attention_mask, pixel_values


def _chi_square(observed: torch.Tensor, expected_probs: torch.Tensor, quantile: float = 0.9999) -> tuple[float, float]:
    """Pearson's statistic of category counts against probabilities, and the chi-square critical value at
    `quantile` (Wilson–Hilferty approximation: scipy is not a dependency). Categories expected under 5 counts are
    pooled into one bin; any count in a category of probability 0 makes the statistic infinite."""
    observed = observed.double()
    if observed[expected_probs == 0].sum() > 0:
        return math.inf, 0.0
    expected = expected_probs.double() * observed.sum()
    pooled = expected < 5
    observed_bins = torch.cat([observed[~pooled], observed[pooled].sum().reshape(1)])
    expected_bins = torch.cat([expected[~pooled], expected[pooled].sum().reshape(1)])
    keep = expected_bins > 0
    statistic = ((observed_bins[keep] - expected_bins[keep]) ** 2 / expected_bins[keep]).sum().item()
    degrees_of_freedom = int(keep.sum().item()) - 1
    scale = 2.0 / (9.0 * degrees_of_freedom)
    critical = degrees_of_freedom * (1.0 - scale + NormalDist().inv_cdf(quantile) * math.sqrt(scale)) ** 3
    return statistic, critical


@pytest.fixture
def chi_square():
    """chi_square(counts, probs) -> (statistic, critical value at the 0.9999 quantile)."""
    return _chi_square


@pytest.fixture
def bigram_stub():
    """The BigramStub class: tests build it from their own logits tables."""
    return BigramStub


@pytest.fixture
def llava_ids():
    """Token ids shared by the tiny Llava/Llama models and their prompts."""
    return SimpleNamespace(vocab=VOCAB, image_token=IMAGE_TOKEN, eos=EOS, pad=PAD)


@pytest.fixture
def tiny_llava():
    """Factory: tiny_llava(hidden_size, seed, eos_bias=0.0, vocab_size=24) -> LlavaForConditionalGeneration."""
    return _build_llava


@pytest.fixture
def tiny_llama():
    """Factory: tiny_llama(hidden_size, seed) -> LlamaForCausalLM."""
    return _build_llama


@pytest.fixture
def image_prompts():
    """(input_ids, attention_mask, pixel_values) of three left-padded image prompts."""
    return _image_prompts()
