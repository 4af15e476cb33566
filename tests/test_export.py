"""``kd_pipeline.export``: a real ZeRO-3 checkpoint of a tiny LoRA student (trained two steps with KD) exported and
reloaded with ``from_pretrained``, against logits the engine computed before saving.

The engine needs a process group, so one subprocess builds it, trains, records the reference and saves the
checkpoint (once per module); the exports run in this process.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kd_pipeline.config import load_config
from kd_pipeline.export import ExportError, load_student_weights, main

REPO = Path(__file__).resolve().parents[1]
TAG = "step_00000002"

ENGINE_SCRIPT = r"""
import sys
import torch
import yaml
from safetensors.torch import save_file

import deepspeed
from kd_pipeline.checkpoint import TrainerState, save_checkpoint
from kd_pipeline.config import config_to_dict, load_config
from kd_pipeline.engine.build import build_engines
from kd_pipeline.recipes.supervised import loss_terms
from kd_pipeline.runtime import init_runtime, seed_everything

run_dir, tokenizer_dir = sys.argv[1], sys.argv[2]
config = load_config(None, [f"data.tokenizer={tokenizer_dir}", f"run.output_dir={run_dir}", "run.stage=kd_sft",
                            "student.lora=true", "student.lora_r=4", "student.lora_alpha=8", "train.lr=0.05",
                            "train.max_steps=2", "train.micro_batch_size=2"])
runtime = init_runtime(5)
seed_everything(0)
engines = build_engines(config, runtime)
generator = torch.Generator().manual_seed(1)
text = torch.randint(3, engines.image_token_id, (2, 12), generator=generator)
image = torch.full((2, engines.num_image_tokens), engines.image_token_id)
input_ids = torch.cat([torch.ones(2, 1, dtype=torch.long), text[:, :4], image, text[:, 4:]], dim=1)
labels = input_ids.clone()
labels[:, : 5 + engines.num_image_tokens] = -100
batch = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels,
             pixel_values=torch.randn(2, 3, 56, 56, generator=generator))
for _ in range(2):
    terms = loss_terms(engines, batch, config)
    engines.student.backward(terms["loss"])
    engines.student.step()
engines.student.eval()
module = engines.student.module
with torch.no_grad():
    logits = module.llava(input_ids=input_ids, attention_mask=batch["attention_mask"],
                          pixel_values=batch["pixel_values"]).logits
with deepspeed.zero.GatheredParameters(list(module.feature_map.parameters())):
    feature_map = {f"feature_map.{k}": v.detach().clone() for k, v in module.feature_map.state_dict().items()}
save_checkpoint(engines.student, f"{run_dir}/checkpoints", TrainerState(step=2), rank=0, world_size=1,
                rank_state={"note": torch.zeros(1)}, config_yaml=yaml.safe_dump(config_to_dict(config)), keep_last=2)
save_file({"input_ids": input_ids, "attention_mask": batch["attention_mask"], "pixel_values": batch["pixel_values"],
           "logits": logits.float().contiguous(), **feature_map}, f"{run_dir}/reference.safetensors")
"""


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tokenizer_dir):
    run_dir = tmp_path_factory.mktemp("run")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    result = subprocess.run([sys.executable, "-c", ENGINE_SCRIPT, str(run_dir), str(tokenizer_dir)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir


def stored(weights: dict, suffix: str) -> torch.Tensor:
    """The one tensor whose key ends with ``suffix`` (transformers chooses the on-disk prefixes)."""
    (key,) = [key for key in weights if key.endswith(suffix)]
    return weights[key]


def error_lines(stderr: str) -> list[str]:
    """The ``error:`` lines of a CLI's stderr (progress bars may come before them)."""
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def reference(run_dir: Path) -> dict:
    return load_file(run_dir / "reference.safetensors")


def exported_logits(out: Path, ref: dict) -> torch.Tensor:
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(out), local_files_only=True).eval()
    with torch.no_grad():
        return model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"],
                     pixel_values=ref["pixel_values"]).logits


def test_merged_export_from_run_folder_reproduces_engine_logits(trained_run, tmp_path, caplog):
    out = tmp_path / "merged"
    caplog.set_level("INFO")
    assert main(["--checkpoint", str(trained_run), "--out", str(out), "--merge-lora"]) == 0
    assert f"using the latest checkpoint of {trained_run}" in caplog.text  # no `best` pointer in this run
    ref = reference(trained_run)
    torch.testing.assert_close(exported_logits(out, ref), ref["logits"], atol=1e-5, rtol=1e-5)
    assert not (out / "adapter_config.json").exists()
    weights = load_file(out / "model.safetensors")
    assert not any("lora_" in key for key in weights) and stored(weights, "lm_head.weight").dtype == torch.float32

    feature_map = load_file(out / "feature_map.safetensors")
    expected = {key.removeprefix("feature_map."): value for key, value in ref.items() if key.startswith("feature_map.")}
    assert expected and feature_map.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(feature_map[key], value, atol=0, rtol=0)
        assert value.shape == (96, 64)  # teacher hidden x student hidden

    provenance = json.loads((out / "export.json").read_text())
    assert provenance["tag"] == TAG and provenance["step"] == 2 and provenance["lora_merged"] is True
    assert load_config(out / "run_config.yaml") == load_config(trained_run / "checkpoints" / TAG / "config.yaml")


def test_unmerged_lora_export_loads_as_base_plus_adapter(trained_run, tmp_path):
    from transformers import AutoImageProcessor

    from kd_pipeline.tokenizer import image_token_id, load_tokenizer

    merged, unmerged = tmp_path / "merged", tmp_path / "adapter"
    checkpoint = trained_run / "checkpoints" / TAG
    assert main(["--checkpoint", str(checkpoint), "--out", str(merged), "--merge-lora"]) == 0
    assert main(["--checkpoint", str(checkpoint), "--out", str(unmerged)]) == 0
    assert (unmerged / "adapter_config.json").is_file() and (unmerged / "adapter_model.safetensors").is_file()
    ref = reference(trained_run)
    torch.testing.assert_close(exported_logits(unmerged, ref), ref["logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(exported_logits(unmerged, ref), exported_logits(merged, ref), atol=1e-5, rtol=1e-5)

    # The adapter carries real change: the stored base projection differs from the merged one.
    key = "model.layers.0.self_attn.q_proj.weight"  # the LLM's, not the CLIP tower's encoder.layers.0
    base = stored(load_file(unmerged / "model.safetensors"), key)
    merged_weight = stored(load_file(merged / "model.safetensors"), key)
    assert (base - merged_weight).abs().max() > 1e-3

    tokenizer = load_tokenizer(unmerged)
    assert (unmerged / "tokenizer.model").is_file() and image_token_id(tokenizer) == 400
    processor = AutoImageProcessor.from_pretrained(str(unmerged), local_files_only=True)
    assert processor.crop_size["height"] == 56 and list(processor.image_mean)[0] == pytest.approx(0.48145466)


def test_geochat_format_and_dtype(trained_run, tmp_path):
    out = tmp_path / "geochat-tiny"
    assert main(["--checkpoint", str(trained_run / "checkpoints" / TAG), "--out", str(out), "--format", "geochat",
                 "--dtype", "bfloat16"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "geochat" and config["mm_projector_type"] == "mlp2x_gelu"
    weights = {key: value for path in out.glob("*.safetensors") if path.name != "feature_map.safetensors"
               for key, value in load_file(path).items()}
    assert weights["lm_head.weight"].dtype == torch.bfloat16 and weights["lm_head.weight"].shape == (400, 64)
    assert (out / "feature_map.safetensors").is_file() and json.loads((out / "export.json").read_text())["lora_merged"]


def test_incomplete_checkpoint_is_refused(trained_run, tmp_path, capsys):
    partial = tmp_path / "checkpoints" / TAG
    shutil.copytree(trained_run / "checkpoints" / TAG, partial)
    (partial / "COMPLETE.json").unlink()
    assert main(["--checkpoint", str(partial), "--out", str(tmp_path / "out")]) == 2
    (error,) = error_lines(capsys.readouterr().err)
    assert str(partial) in error and "COMPLETE.json" in error
    assert not (tmp_path / "out").exists()
    assert main(["--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--checkpoint", str(trained_run), "--out", str(tmp_path)]) == 2  # holds the copied checkpoint
    (error,) = error_lines(capsys.readouterr().err)
    assert f"--out {tmp_path} already exists and is not empty" in error


def test_edited_config_is_refused(trained_run, tmp_path, capsys):
    edited = tmp_path / TAG
    shutil.copytree(trained_run / "checkpoints" / TAG, edited)
    config_file = edited / "config.yaml"
    text = config_file.read_text()
    assert "num_layers: 2\n" in text
    config_file.write_text(text.replace("num_layers: 2\n", "num_layers: 3\n", 1))  # same size, other model
    assert main(["--checkpoint", str(edited), "--out", str(tmp_path / "a")]) == 2
    assert "sha256" in capsys.readouterr().err
    assert main(["--checkpoint", str(edited), "--out", str(tmp_path / "b"), "--no-hash-check"]) == 2
    (error,) = error_lines(capsys.readouterr().err)
    assert "does not match the student built from its config.yaml" in error and "layers.2" in error


def test_load_student_weights_is_strict():
    model = torch.nn.Linear(3, 2)
    good = {"llava.weight": torch.randn(2, 3), "llava.bias": torch.randn(2)}
    load_student_weights(model, good)
    torch.testing.assert_close(model.weight.detach(), good["llava.weight"], atol=0, rtol=0)
    with pytest.raises(ExportError, match="1 missing"):
        load_student_weights(model, {"llava.weight": torch.randn(2, 3)})
    with pytest.raises(ExportError, match="1 unexpected"):
        load_student_weights(model, {**good, "llava.extra": torch.zeros(1)})
    with pytest.raises(ExportError, match=r"llava|weight is \(3, 3\)"):
        load_student_weights(model, {**good, "llava.weight": torch.randn(3, 3)})
