"""Model efficiency (paper Table 8): parameter counts, analytic forward FLOPs, measured generation speed.

Parameters. `count_parameters` sorts a `LlavaForConditionalGeneration`'s named parameters by the first key segment
naming a component (transformers 5.24: `model.vision_tower.*`, `model.multi_modal_projector.*`,
`model.language_model.*`, `lm_head.*`; 4.x put the same names at other depths, GeoChat calls the projector
`mm_projector`), so it works for any release using these names and on meta-device models (numel only). The paper
counts LLM (embeddings, decoder, lm_head) + projector + the vision position table: at 504 px that is exactly
6760.72 M (7B) and 13048.66 M (13B), the Table 8 values; `total` adds the rest of the CLIP tower (~303 M).

FLOPs (`forward_flops`). Counting convention: 2 FLOPs per multiply-accumulate of every matrix product, i.e.
    vision tower: patch conv + per layer q/k/v/out and fc1/fc2 (every layer runs: the LLaVA code asks the tower for
      all hidden states and then takes layer -2), plus attention's quadratic term QK^T and A·V over all positions;
    projector: Linear(vision -> H) and Linear(H -> H) on the image tokens;
    LLM: per layer q/k/v/o and gate/up/down on all L positions, QK^T and A·V as full L x L products (SDPA with a
      causal mask still computes them), and lm_head on all positions (what `forward` returns) or on fewer.
`matmul_only` is that sum: it is what `torch.utils.flop_counter.FlopCounterMode` counts (mm/addmm/bmm/conv/sdpa;
bias adds are not counted), and the tests find the two exactly equal on a tiny model run with eager attention.
With SDPA on CPU the counter misses attention (its CPU flash kernel has no FLOP formula in torch 2.13), so there
it reports matmul_only minus vision_attention and llm_attention.
`elementwise` is a rough estimate of the rest (norms, activations, softmax, residual and bias adds, rotary), with
the per-element costs in ELEMENTWISE_FLOPS; `total` = matmul_only + elementwise (under 1% more at GeoChat sizes).

The paper's numbers. 6904.53 G (7B) and 13377.05 G (13B) are reproduced to 0.02% by `matmul_only` for ONE TEXT-ONLY
forward of 512 tokens with no image (6903.09 G and 13374.80 G): both sizes give the same 512.1-token length, so
that is most likely how they were measured; the 0.02% left over scales with layers x hidden, as elementwise ops do.
`PAPER_TEXT_TOKENS` holds that convention. A real benchmark forward (one 504-px image = 1296 image tokens + the
prompt) costs about 2.9x more (19945.62 G for 7B with 64 text tokens): see `geochat_efficiency_rows`.

Speed. `measure_generation(model, inputs, new_tokens)` times greedy `generate` calls that produce exactly
`new_tokens` tokens (EOS ignored through min_new_tokens) and reports the median latency and tokens/s.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

PAPER_TEXT_TOKENS = 512

# Rough per-element FLOP costs for the `elementwise` estimate (one FLOP per arithmetic op, transcendental = 1).
ELEMENTWISE_FLOPS = {
    "layer_norm": 5,  # mean, subtract, square-and-mean, scale, affine
    "rms_norm": 4,  # square-and-mean, rsqrt scale, weight
    "activation": 4,  # GELU / quick-GELU / SiLU
    "softmax": 5,  # max, subtract, exp, sum, divide (per attention score, plus 1 for the 1/sqrt(d) scale)
    "rotary": 3,  # two multiplies and an add per q/k element
    "add": 1,  # residual or bias add, gating multiply
}

_VISION_SEGMENTS = ("vision_tower",)
_PROJECTOR_SEGMENTS = ("multi_modal_projector", "mm_projector")
_LANGUAGE_SEGMENTS = ("language_model", "lm_head")
_POSITION_TABLE_SUFFIX = "position_embedding.weight"


@dataclass(frozen=True)
class ParameterCount:
    """Parameter counts of a LLaVA model by component (numel; tied weights counted once)."""

    vision_tower: int  # whole CLIP tower, position table included
    vision_position_table: int
    projector: int
    language_model: int  # embeddings + decoder + final norm + lm_head
    other: int  # parameters under none of the names above

    @property
    def paper(self) -> int:
        """The paper's count: LLM + projector + vision position table."""
        return self.language_model + self.projector + self.vision_position_table

    @property
    def total(self) -> int:
        return self.vision_tower + self.projector + self.language_model + self.other


def count_parameters(model: torch.nn.Module) -> ParameterCount:
    """Count a LLaVA model's parameters by component from its named_parameters (works on the meta device).

    Raises:
        ValueError: no parameter sits under a language-model name (not a LLaVA-style model).
    """
    counts = dict.fromkeys(("vision_tower", "vision_position_table", "projector", "language_model", "other"), 0)
    for name, parameter in model.named_parameters():
        segments = name.split(".")
        numel = parameter.numel()
        if any(segment in _VISION_SEGMENTS for segment in segments):
            counts["vision_tower"] += numel
            if name.endswith(_POSITION_TABLE_SUFFIX):
                counts["vision_position_table"] += numel
        elif any(segment in _PROJECTOR_SEGMENTS for segment in segments):
            counts["projector"] += numel
        elif any(segment in _LANGUAGE_SEGMENTS for segment in segments):
            counts["language_model"] += numel
        else:
            counts["other"] += numel
    if counts["language_model"] == 0:
        raise ValueError(
            f"{type(model).__name__} has no parameters under {_LANGUAGE_SEGMENTS}: expected a LLaVA-style model "
            "(LlavaForConditionalGeneration)"
        )
    return ParameterCount(**counts)


@dataclass(frozen=True)
class ForwardFlops:
    """FLOPs of one forward pass by part, 2 FLOPs per multiply-accumulate (convention in the module docstring)."""

    vision_matmul: int
    vision_attention: int
    projector_matmul: int
    llm_matmul: int
    llm_attention: int
    lm_head_matmul: int
    elementwise: int
    image_tokens: int
    sequence_length: int

    @property
    def matmul_only(self) -> int:
        return (
            self.vision_matmul + self.vision_attention + self.projector_matmul
            + self.llm_matmul + self.llm_attention + self.lm_head_matmul
        )

    @property
    def total(self) -> int:
        return self.matmul_only + self.elementwise


def forward_flops(
    config: Any, text_tokens: int, num_images: int = 1, logits_positions: int | None = None
) -> ForwardFlops:
    """Analytic FLOPs of one LLaVA forward with `num_images` images and `text_tokens` text tokens (batch 1).

    Args:
        config: a `LlavaConfig` (CLIP-style vision config, LLaMA-style text config with a gated MLP).
        text_tokens: text positions, not counting the image placeholders (each image adds its image tokens).
        num_images: images in the prompt; 0 gives a text-only forward (no vision tower, no projector).
        logits_positions: positions that go through lm_head; None = all (as `forward` does), 1 = generation prefill.

    Raises:
        ValueError: negative counts, or an empty sequence.
    """
    if text_tokens < 0 or num_images < 0:
        raise ValueError(f"text_tokens ({text_tokens}) and num_images ({num_images}) must be >= 0")
    vision, text = config.vision_config, config.text_config
    patches = (vision.image_size // vision.patch_size) ** 2
    vision_positions = patches + 1  # CLS first
    image_tokens = patches + (config.vision_feature_select_strategy == "full")
    sequence = text_tokens + num_images * image_tokens
    if sequence <= 0:
        raise ValueError("the forward has no positions: give text_tokens > 0 or num_images > 0")
    lm_positions = sequence if logits_positions is None else min(logits_positions, sequence)

    vision_width, vision_ffn = vision.hidden_size, vision.intermediate_size
    patch_macs = patches * vision.num_channels * vision.patch_size**2 * vision_width
    vision_layer_macs = vision_positions * (4 * vision_width**2 + 2 * vision_width * vision_ffn)
    vision_attention_macs = 2 * vision_positions**2 * vision_width
    feature_layers = config.vision_feature_layer
    projector_in = vision_width * (len(feature_layers) if isinstance(feature_layers, (list, tuple)) else 1)

    width, ffn, layers, vocab = text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.vocab_size
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or width // heads
    attention_width, kv_width = heads * head_dim, kv_heads * head_dim
    llm_layer_macs = sequence * (2 * width * attention_width + 2 * width * kv_width + 3 * width * ffn)
    llm_attention_macs = 2 * sequence**2 * attention_width

    cost = ELEMENTWISE_FLOPS
    vision_elementwise = vision.num_hidden_layers * (
        vision_positions * (2 * cost["layer_norm"] * vision_width + 2 * cost["add"] * vision_width)
        + vision_positions * cost["add"] * (4 * vision_width + vision_ffn)  # biases
        + vision_positions * cost["activation"] * vision_ffn
        + vision.num_attention_heads * vision_positions**2 * (cost["softmax"] + 1)
    ) + vision_positions * cost["layer_norm"] * vision_width  # pre-layernorm
    projector_elementwise = image_tokens * (cost["activation"] * width + 2 * cost["add"] * width)
    llm_elementwise = layers * (
        sequence * (2 * cost["rms_norm"] * width + 2 * cost["add"] * width)
        + sequence * (cost["activation"] + cost["add"]) * ffn  # SiLU(gate) * up
        + sequence * cost["rotary"] * (attention_width + kv_width)
        + heads * sequence**2 * (cost["softmax"] + 1)
    ) + sequence * cost["rms_norm"] * width  # final norm

    return ForwardFlops(
        vision_matmul=2 * num_images * (patch_macs + vision.num_hidden_layers * vision_layer_macs),
        vision_attention=2 * num_images * vision.num_hidden_layers * vision_attention_macs,
        projector_matmul=2 * num_images * image_tokens * (projector_in * width + width * width),
        llm_matmul=2 * layers * llm_layer_macs,
        llm_attention=2 * layers * llm_attention_macs,
        lm_head_matmul=2 * lm_positions * width * vocab,
        elementwise=num_images * (vision_elementwise + projector_elementwise) + llm_elementwise,
        image_tokens=num_images * image_tokens,
        sequence_length=sequence,
    )


def geochat_config(size: str, image_size: int = 504) -> Any:
    """A `LlavaConfig` with GeoChat's shapes: CLIP ViT-L/14 run at `image_size`, Vicuna-v1.5 "7b" or "13b"."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    llm_shapes = {"7b": (4096, 11008, 32, 32), "13b": (5120, 13824, 40, 40)}
    if size not in llm_shapes:
        raise ValueError(f"size must be one of {sorted(llm_shapes)}, got {size!r}")
    width, ffn, layers, heads = llm_shapes[size]
    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=image_size, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        hidden_size=width, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
    )
    image_tokens = (image_size // 14) ** 2
    return LlavaConfig(
        vision_config=vision, text_config=text, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", image_token_index=32000, image_seq_length=image_tokens,
    )


def efficiency_metrics(model: torch.nn.Module, config: Any, text_tokens: int) -> dict[str, Any]:
    """The Table 8 entry of one model: parameters (paper and total) and forward FLOPs in both conventions."""
    parameters = count_parameters(model)
    benchmark = forward_flops(config, text_tokens=text_tokens, num_images=1)
    paper_style = forward_flops(config, text_tokens=PAPER_TEXT_TOKENS, num_images=0)
    return {
        "params_paper": parameters.paper,
        "params_total": parameters.total,
        "parameters": asdict(parameters),
        "flops_paper_convention": paper_style.matmul_only,
        "flops_forward_matmul": benchmark.matmul_only,
        "flops_forward_total": benchmark.total,
        "flops_forward_parts": asdict(benchmark),
        "flops_convention": (
            f"2 FLOPs/MAC; paper convention = text-only forward of {PAPER_TEXT_TOKENS} tokens, matmul only; "
            f"forward = 1 image ({benchmark.image_tokens} image tokens) + {text_tokens} text tokens, "
            "lm_head on all positions"
        ),
    }


def geochat_efficiency_rows(text_tokens: int = 64, sizes: tuple[str, ...] = ("7b", "13b")) -> dict[str, dict[str, Any]]:
    """Table 8 rows for GeoChat's 7B/13B shapes, built on the meta device (no weights, no memory)."""
    from transformers import LlavaForConditionalGeneration

    rows = {}
    for size in sizes:
        config = geochat_config(size)
        with torch.device("meta"):
            model = LlavaForConditionalGeneration(config)
        rows[f"GeoChat-{size.upper()}"] = efficiency_metrics(model, config, text_tokens)
    return rows


@dataclass(frozen=True)
class GenerationTiming:
    """Measured greedy generation: median wall time of one call and the resulting rate."""

    prompt_tokens: int
    new_tokens: int
    latency_s: float
    tokens_per_s: float
    repeats: int


@torch.inference_mode()
def measure_generation(
    model: torch.nn.Module, inputs: Mapping[str, torch.Tensor], new_tokens: int, warmup: int = 1, repeats: int = 3
) -> GenerationTiming:
    """Time `model.generate(**inputs)` producing exactly `new_tokens` greedy tokens (batch as given).

    Warm-up calls (kernel selection, caches) are not timed; CUDA work is synchronised before each clock read.

    Raises:
        ValueError: new_tokens or repeats below 1.
        RuntimeError: generate returned a different number of new tokens.
    """
    if new_tokens < 1 or repeats < 1:
        raise ValueError(f"new_tokens ({new_tokens}) and repeats ({repeats}) must be >= 1")
    device = next(model.parameters()).device
    prompt_tokens = int(inputs["input_ids"].shape[1])

    def synchronise() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def generate_once() -> float:
        synchronise()
        start = time.perf_counter()
        output_ids = model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )  # (B, prompt + new)
        synchronise()
        elapsed = time.perf_counter() - start
        produced = output_ids.shape[1] - prompt_tokens
        if produced != new_tokens:
            raise RuntimeError(f"generate produced {produced} new tokens, expected {new_tokens}")
        return elapsed

    for _ in range(warmup):
        generate_once()
    latency = statistics.median(generate_once() for _ in range(repeats))
    return GenerationTiming(
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        latency_s=latency,
        tokens_per_s=new_tokens * inputs["input_ids"].shape[0] / latency,
        repeats=repeats,
    )
