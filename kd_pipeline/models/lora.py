"""LoRA on the LLM of a LLaVA model through peft, as GeoChat trains (r 64, alpha 16, dropout 0.05, bias none).

Only the LLM's q/k/v/o/gate/up/down projections are adapted. A plain list of names (``["q_proj", ...]``) would also
match the CLIP tower's ``q_proj``/``k_proj``/``v_proj``, so the target is a regex anchored at the language model's
prefix (read from the installed transformers, see ``layout.py``); peft full-matches a string target against every
module name.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

from torch import nn

from kd_pipeline.config import ModelConfig
from kd_pipeline.models.layout import llava_layout, unwrap_model

if TYPE_CHECKING:
    from peft import PeftModel

log = logging.getLogger(__name__)

LORA_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
"""The Linear layers of each LLaMA decoder layer that receive adapters (GeoChat's target set)."""


def lora_target_regex(model: nn.Module) -> str:
    """Regex matching exactly the LLM decoder layers' projections of ``model``, e.g.
    ``model\\.language_model\\.layers\\.\\d+\\.(?:self_attn\\.q_proj|...)`` in transformers 5.x."""
    prefix = llava_layout(model).language_model
    alternatives = "|".join(re.escape(name) for name in LORA_PROJECTIONS)
    return rf"{re.escape(prefix)}\.layers\.\d+\.(?:{alternatives})"


def apply_lora(model: nn.Module, model_cfg: ModelConfig) -> PeftModel:
    """Wrap ``model`` in a peft LoRA model with ``model_cfg``'s rank, alpha and dropout.

    peft freezes every base weight; callers re-enable what else should train (the projector) afterwards.
    """
    # Imported here, not at module level: importing peft costs seconds (it imports transformers model classes)
    # and a run without LoRA never needs it.
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=model_cfg.lora_r, lora_alpha=model_cfg.lora_alpha, lora_dropout=model_cfg.lora_dropout,
                        bias="none", target_modules=lora_target_regex(model))
    peft_model = get_peft_model(model, config)
    adapted = [name for name, module in unwrap_model(peft_model).named_modules() if hasattr(module, "lora_A")]
    log.info("LoRA r=%d alpha=%d dropout=%.2f on %d LLM projections", model_cfg.lora_r, model_cfg.lora_alpha,
             model_cfg.lora_dropout, len(adapted))
    return peft_model
