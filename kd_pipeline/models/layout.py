"""Where each part of a ``LlavaForConditionalGeneration`` lives, found by module type, never by a hard-coded name.

transformers moves LLaVA's parts between releases (4.4x: ``language_model.model.*``; 5.x:
``model.language_model.*``; CLIP's ``vision_model.`` level came and went). The LoRA target regex, the checkpoint
converter and the parameter counter all read the prefixes from here, taken from the installed version's modules.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import CLIPVisionModel, LlamaModel, LlavaForConditionalGeneration
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector


@dataclass(frozen=True)
class LlavaLayout:
    """Dotted module names inside one LLaVA model (state-dict keys are these plus ``.`` plus a suffix)."""

    language_model: str
    """The LlamaModel: embed_tokens, layers, norm."""
    lm_head: str
    """The output projection (not tied to the embeddings in GeoChat)."""
    projector: str
    """The mlp2x_gelu projector."""
    projector_linears: tuple[str, ...]
    """The projector's Linear layers in forward order (GeoChat's ``mm_projector.0`` and ``mm_projector.2``)."""
    vision_tower: str
    """The CLIP vision tower."""
    position_embedding: str
    """The tower's position table module (its ``.weight`` is the 577- or 1297-row table)."""


def unwrap_model(model: nn.Module) -> LlavaForConditionalGeneration:
    """The ``LlavaForConditionalGeneration`` inside ``model``: itself, or inside a DeepSpeed engine / DDP
    (``.module``) and/or a peft wrapper (``get_base_model()``)."""
    inner = getattr(model, "module", None)
    model = inner if isinstance(inner, nn.Module) else model
    get_base_model = getattr(model, "get_base_model", None)
    base = get_base_model() if callable(get_base_model) else model
    if not isinstance(base, LlavaForConditionalGeneration):
        raise TypeError(f"expected a LlavaForConditionalGeneration (or a wrapper of one), got {type(base).__name__}")
    return base


def _only(names: list[str], what: str, model: nn.Module) -> str:
    if len(names) != 1:
        raise TypeError(f"expected exactly one {what} in {type(model).__name__}, found {len(names)}: {names}")
    return names[0]


def llava_layout(model: nn.Module) -> LlavaLayout:
    """Find every part of ``model`` (a LLaVA model or a wrapper of one) by type; names are relative to the LLaVA."""
    llava = unwrap_model(model)
    modules = list(llava.named_modules())
    lm_head_module = llava.get_output_embeddings()
    language_model = _only([n for n, m in modules if isinstance(m, LlamaModel)], "LlamaModel", llava)
    vision_tower = _only([n for n, m in modules if isinstance(m, CLIPVisionModel)], "CLIPVisionModel", llava)
    projector = _only([n for n, m in modules if isinstance(m, LlavaMultiModalProjector)], "projector", llava)
    lm_head = _only([n for n, m in modules if m is lm_head_module], "lm_head", llava)
    projector_module = llava.get_submodule(projector)
    # named_modules yields children in registration order, which is forward order for this projector.
    linears = tuple(f"{projector}.{n}" for n, m in projector_module.named_children() if isinstance(m, nn.Linear))
    position_embedding = _only([n for n, m in modules if n.startswith(vision_tower + ".")
                                and n.endswith("position_embedding") and isinstance(m, nn.Embedding)],
                               "position_embedding", llava)
    return LlavaLayout(language_model=language_model, lm_head=lm_head, projector=projector,
                       projector_linears=linears, vision_tower=vision_tower, position_embedding=position_embedding)
