"""The one place where DeepSpeed settings are decided: the ds_configs JSON says "auto" for everything the run
config owns (batch sizes, clipping, precision, bucket sizes) and this module fills it in.

A value the JSON fixes explicitly is respected only when it agrees with the run config; a disagreement (say the JSON
hard-codes a micro-batch of 4 while ``train.micro_batch_size=2``) is refused, so there is never a second source of
truth. Optimizer and scheduler sections are refused too: the recipe builds AdamW and the cosine schedule itself from
``train.*`` (DeepSpeed's CPU accelerator has no fused Adam, and one code path for both devices keeps resume exact).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from kd_pipeline.config import Config, ConfigError


def load_ds_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"deepspeed.config: {path} does not exist (ship one under ds_configs/)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"deepspeed.config: {path} is not valid JSON: {error}") from error


def _fill(section: dict, key: str, value: Any, where: str) -> None:
    current = section.get(key, "auto")
    if current == "auto":
        section[key] = value
    elif current != value:
        raise ConfigError(f"{where}.{key} is {current!r} in the DeepSpeed JSON but the run config implies {value!r}: "
                          f"set it to \"auto\" and change the run config instead")


def resolve_ds_config(config: Config, *, world_size: int, dtype: torch.dtype, hidden_size: int,
                      for_teacher: bool = False) -> dict[str, Any]:
    """The student's (or, with ``for_teacher``, the frozen teacher's) DeepSpeed config with no "auto" left."""
    raw = load_ds_json(config.deepspeed.config)
    for forbidden in ("optimizer", "scheduler"):
        if forbidden in raw:
            raise ConfigError(f"{config.deepspeed.config} has an {forbidden!r} section: remove it, the recipe builds "
                              f"AdamW and the cosine schedule from train.*")
    resolved = copy.deepcopy(raw)
    micro, accum = config.train.micro_batch_size, config.train.grad_accum
    _fill(resolved, "train_micro_batch_size_per_gpu", micro, "top level")
    _fill(resolved, "gradient_accumulation_steps", accum, "top level")
    _fill(resolved, "train_batch_size", micro * accum * world_size, "top level")
    _fill(resolved, "gradient_clipping", config.train.grad_clip, "top level")
    resolved.setdefault("bf16", {})
    _fill(resolved["bf16"], "enabled", dtype == torch.bfloat16, "bf16")
    zero = resolved.setdefault("zero_optimization", {})
    # HF's conventions for these sizes, which scale with the model width.
    _fill(zero, "reduce_bucket_size", hidden_size * hidden_size, "zero_optimization")
    _fill(zero, "stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size), "zero_optimization")
    _fill(zero, "stage3_param_persistence_threshold", 10 * hidden_size, "zero_optimization")
    if for_teacher:
        # Inference only: no optimizer state anywhere, parameters optionally offloaded. ZeRO-1/2 partition only
        # optimizer state and gradients, which a frozen teacher has none of (and DeepSpeed refuses them without an
        # optimizer): below stage 3 the teacher runs unpartitioned.
        zero.pop("offload_optimizer", None)
        if int(zero.get("stage", 0)) < 3:
            zero["stage"] = 0
        if config.deepspeed.offload_teacher_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if "offload_optimizer" in zero:
        resolved["zero_force_ds_cpu_optimizer"] = False
    if not for_teacher and config.checkpoint.universal == "always":
        # The student loads DeepSpeed's universal format (a resume under another world size). Recipes resolve
        # checkpoint.universal=auto to always/never before building engines (recipes.common.prepare_resume).
        _fill(resolved.setdefault("checkpoint", {}), "load_universal", True, "checkpoint")
    leftover = [path for path in _auto_paths(resolved)]
    if leftover:
        raise ConfigError(f"{config.deepspeed.config}: no rule fills \"auto\" at {', '.join(leftover)}")
    return resolved


def _auto_paths(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for key, value in node.items() for p in _auto_paths(value, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if node == "auto" else []


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))
