"""Every YAML under configs/ (recursively) loads and validates; every DeepSpeed JSON resolves with no "auto" left."""

from pathlib import Path

import pytest
import torch

from kd_pipeline.config import load_config
from kd_pipeline.engine.ds_config import resolve_ds_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
DS_CONFIGS = sorted((ROOT / "ds_configs").rglob("*.json"))


def test_configs_found():
    assert len(CONFIGS) >= 2 and len(DS_CONFIGS) >= 1


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_config_validates(path):
    config = load_config(path)
    assert config.run.stage in ("sft", "kd_sft", "minillm")
    header = path.read_text().splitlines()[:30]
    assert any("Launch" in line or "launch" in line for line in header), "config header must give the launch command"


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_ds_config_resolves(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    config = load_config(ROOT / "configs" / "tiny_cpu.yaml", [f"deepspeed.config={path}"])
    resolved = resolve_ds_config(config, world_size=2, dtype=torch.float32, hidden_size=64)
    assert resolved["train_batch_size"] == config.train.micro_batch_size * config.train.grad_accum * 2
    assert resolved["bf16"]["enabled"] is False
    teacher = resolve_ds_config(config, world_size=2, dtype=torch.bfloat16, hidden_size=96, for_teacher=True)
    assert teacher["bf16"]["enabled"] is True and "offload_optimizer" not in teacher["zero_optimization"]
    # the frozen teacher keeps ZeRO-3's partitioning; below stage 3 there is nothing of its to partition
    student_stage = resolved["zero_optimization"].get("stage", 0)
    assert teacher["zero_optimization"]["stage"] == (3 if student_stage == 3 else 0)
