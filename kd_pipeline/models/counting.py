"""Parameter counts of a LLaVA/GeoChat model by part: the one source of truth for the efficiency tables.

The paper's Table 8 counts (GeoChat-7B 6760.72 M, GeoChat-13B 13048.66 M) are exactly
LLM (32000 vocabulary rows) + projector + the 1297 x 1024 position table. That sum is what GeoChat trains when its
CLIP tower is frozen: GeoChat re-creates the position table as a new, trainable ``nn.Parameter`` after freezing the
tower. (kd_pipeline freezes the re-created table too; the count keeps the paper's definition.)
Our transformers layout carries one extra row pair for ``<image>`` (embedding + lm_head, see ``geochat.py``), which
GeoChat does not have: it is reported as ``image_token_rows`` and left out of ``paper``.

Works on meta-device models (only shapes are read), on peft-wrapped ones (LoRA weights counted apart) and on
DeepSpeed ZeRO-3 models (a partitioned parameter's full size is its ``ds_numel``).
"""

from __future__ import annotations

from torch import nn

from kd_pipeline.models.layout import llava_layout, unwrap_model

PARTS = ("llm", "projector", "vision_tower", "position_table", "lora", "other")
"""Disjoint parts; their sum is ``total``. ``vision_tower`` excludes its position table."""


def _part_of(name: str, prefixes: dict[str, str], lora_prefix: str) -> str:
    if lora_prefix in name:  # peft names its adapter weights lora_A / lora_B / lora_embedding_* / ...
        return "lora"
    for part, prefix in prefixes.items():
        if name.startswith(prefix + "."):
            return part
    return "other"


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Counts by part plus ``total``, ``trainable``, ``image_token_rows`` and ``paper`` (see the module docstring).

    Keys: llm (embeddings, decoder, norm, lm_head; all rows), projector, vision_tower (without the position
    table), position_table, lora, other (anything unrecognised; 0 for GeoChat), total, trainable,
    image_token_rows (the ``<image>`` row of the embedding and of an untied lm_head), paper.
    """
    # Imported here: peft costs seconds to import and the training start-up imports this module.
    from peft.tuners.lora import LoraModel

    llava = unwrap_model(model)
    parts = llava_layout(llava)
    # Most specific first: the position table lives inside the vision tower.
    prefixes = {"position_table": parts.position_embedding, "vision_tower": parts.vision_tower,
                "projector": parts.projector, "llm": parts.language_model, "lm_head": parts.lm_head}
    counts = dict.fromkeys(PARTS, 0)
    trainable = 0
    for name, parameter in llava.named_parameters():  # shared (tied) parameters are yielded once
        size = getattr(parameter, "ds_numel", parameter.numel())
        part = _part_of(name, prefixes, LoraModel.prefix)
        counts["llm" if part == "lm_head" else part] += size
        trainable += size if parameter.requires_grad else 0
    counts["total"] = sum(counts[part] for part in PARTS)
    counts["trainable"] = trainable
    counts["image_token_rows"] = _image_token_rows(llava)
    counts["paper"] = counts["llm"] - counts["image_token_rows"] + counts["projector"] + counts["position_table"]
    return counts


def _image_token_rows(llava: nn.Module) -> int:
    """Parameters in the ``<image>`` row of the input embedding and, when untied, of the lm_head."""
    image_token_id = llava.config.image_token_id
    tables = {id(t): t for t in (llava.get_input_embeddings().weight, llava.get_output_embeddings().weight)}
    shapes = [getattr(table, "ds_shape", table.shape) for table in tables.values()]  # (V, H), also under ZeRO-3
    return sum(shape[1] for shape in shapes if image_token_id < shape[0])


def millions(count: int) -> float:
    """``count`` in millions rounded to 0.01 M, as the paper reports (6760.72)."""
    return round(count / 1e6, 2)
