"""State-dict key names: GeoChat/LLaVA checkpoints <-> the installed transformers' ``LlavaForConditionalGeneration``.

The transformers side is never written down here: every target key comes from a (meta-device) model's
``state_dict()``, split into parts by ``models.layout`` (found by module type). A key's *suffix* relative to its
part (``layers.3.self_attn.q_proj.weight``, ``encoder.layers.0.mlp.fc1.bias``) is the same on both sides; only the
part prefixes differ:

=================  ==============================================  ==========================================
part               GeoChat / LLaVA checkpoint                       transformers 5.24 (read at run time)
=================  ==============================================  ==========================================
LLM                ``model.`` + suffix                              ``model.language_model.`` + suffix
lm_head            ``lm_head.`` + suffix                            ``lm_head.`` + suffix
projector          ``model.mm_projector.{0,2}.`` + weight/bias      ``model.multi_modal_projector.linear_{1,2}.``
vision tower       ``model.vision_tower.vision_tower.vision_model.``  ``model.vision_tower.`` + suffix
=================  ==============================================  ==========================================

CLIP's own checkpoints put the tower under ``vision_model.`` (CLIPModel and older CLIPVisionModel files); some
transformers releases add that level inside LLaVA too. Tower suffixes are therefore taken after the last
``vision_model.``, on either side.
"""

from __future__ import annotations

from collections.abc import Iterable

from kd_pipeline.models.layout import LlavaLayout

GEOCHAT_LLM_PREFIX = "model."
GEOCHAT_LM_HEAD_PREFIX = "lm_head."
GEOCHAT_PROJECTOR_PREFIX = "model.mm_projector."
GEOCHAT_TOWER_PREFIX = "model.vision_tower.vision_tower.vision_model."
CLIP_TOWER_LEVEL = "vision_model."

DROPPED_BUFFERS = ("rotary_emb.inv_freq", "position_ids")
"""Buffers some checkpoints store; transformers recomputes them at load, so they are dropped (and logged)."""

CLIP_NON_VISION_PREFIXES = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")
"""Keys of a full CLIPModel checkpoint that are not part of the vision tower."""


def is_dropped_buffer(key: str) -> bool:
    return key.endswith(DROPPED_BUFFERS)


def tower_suffix(key: str) -> str:
    """``...vision_model.encoder.layers.0.mlp.fc1.weight`` -> ``encoder.layers.0.mlp.fc1.weight``."""
    index = key.rfind(CLIP_TOWER_LEVEL)
    return key[index + len(CLIP_TOWER_LEVEL):] if index >= 0 else key


def _relative(key: str, prefix: str) -> str | None:
    return key[len(prefix) + 1:] if key.startswith(prefix + ".") else None


def geochat_key(hf_key: str, layout: LlavaLayout) -> str:
    """The GeoChat checkpoint name of one transformers state-dict key."""
    if (suffix := _relative(hf_key, layout.vision_tower)) is not None:
        return GEOCHAT_TOWER_PREFIX + tower_suffix(suffix)
    for index, linear in enumerate(layout.projector_linears):
        if (suffix := _relative(hf_key, linear)) is not None:
            # GeoChat's mlp2x_gelu is nn.Sequential(Linear, GELU, Linear): Linear k sits at index 2k.
            return f"{GEOCHAT_PROJECTOR_PREFIX}{2 * index}.{suffix}"
    if (suffix := _relative(hf_key, layout.lm_head)) is not None:
        return GEOCHAT_LM_HEAD_PREFIX + suffix
    if (suffix := _relative(hf_key, layout.language_model)) is not None:
        return GEOCHAT_LLM_PREFIX + suffix
    raise KeyError(f"{hf_key} belongs to no known part of the LLaVA model (layout {layout})")


def geochat_key_map(hf_keys: Iterable[str], layout: LlavaLayout) -> dict[str, str]:
    """GeoChat key -> transformers key, for every transformers key (tower keys included)."""
    mapping: dict[str, str] = {}
    for hf_key in hf_keys:
        name = geochat_key(hf_key, layout)
        if name in mapping:
            raise KeyError(f"{hf_key} and {mapping[name]} both map to GeoChat key {name}")
        mapping[name] = hf_key
    return mapping


def is_tower_key(geochat_name: str) -> bool:
    return geochat_name.startswith(GEOCHAT_TOWER_PREFIX)


def embedding_keys(layout: LlavaLayout, hf_keys: Iterable[str]) -> tuple[str, str]:
    """The transformers keys of the input embedding table and the lm_head weight (both vocabulary-sized)."""
    keys = list(hf_keys)
    embed = [k for k in keys if k.startswith(layout.language_model + ".") and k.endswith("embed_tokens.weight")]
    head = [k for k in keys if k == f"{layout.lm_head}.weight"]
    if len(embed) != 1 or len(head) != 1:
        raise KeyError(f"expected one embed_tokens.weight and one {layout.lm_head}.weight, found {embed} and {head}")
    return embed[0], head[0]
