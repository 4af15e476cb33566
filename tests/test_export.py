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

import numpy as np
import pytest
import torch
from PIL import Image
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

run_dir, tokenizer_dir, extra = sys.argv[1], sys.argv[2], sys.argv[3:]
config = load_config(None, [f"data.tokenizer={tokenizer_dir}", f"run.output_dir={run_dir}", "run.stage=kd_sft",
                            "student.lora=true", "student.lora_r=4", "student.lora_alpha=8", "train.lr=0.05",
                            "train.max_steps=2", "train.micro_batch_size=2", *extra])
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


def train_two_steps(run_dir: Path, tokenizer_dir: Path, *overrides: str) -> Path:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    result = subprocess.run([sys.executable, "-c", ENGINE_SCRIPT, str(run_dir), str(tokenizer_dir), *overrides],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tokenizer_dir):
    return train_two_steps(tmp_path_factory.mktemp("run"), tokenizer_dir)


@pytest.mark.parametrize("stage", [0, 1])
def test_zero_stage_0_and_1_checkpoints_export_whole(tmp_path, tokenizer_dir, stage):
    """ZeRO-1/2 consolidation covers only the optimizer's parameters: the frozen CLIP tower comes from the full
    module in the model-states file (configs/repro train with ds_configs/zero1.json); without ZeRO that module is
    the whole state."""
    ds_json = json.loads((REPO / "ds_configs" / "zero1.json").read_text())
    ds_json["zero_optimization"]["stage"] = stage
    (tmp_path / "ds.json").write_text(json.dumps(ds_json))
    run_dir = train_two_steps(tmp_path / "run", tokenizer_dir, f"deepspeed.config={tmp_path / 'ds.json'}")
    out = tmp_path / "merged"
    assert main(["--checkpoint", str(run_dir), "--out", str(out), "--merge-lora"]) == 0
    ref = reference(run_dir)
    torch.testing.assert_close(exported_logits(out, ref), ref["logits"], atol=1e-5, rtol=1e-5)


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
    assert processor.do_pad and not processor.do_center_crop and processor.size == {"height": 56, "width": 56}
    assert list(processor.image_mean)[0] == pytest.approx(0.48145466)


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


# ----------------------------------------------------------------------------------------------------- processor


# GeoChat's demo photos (mbzuai-oryx/GeoChat demo_images/): 7292.JPG is a 4592 x 3072 camera JPEG,
# church_183.png 600 x 600, 04133.png 800 x 800, MicrosoftTeams-image.png 389 x 389. Images of those sizes are made
# here, plus a small landscape strip whose padding is odd (139 rows: one more below than above).
DEMO_SIZES = {"camera.jpg": (4592, 3072), "church.png": (600, 600), "scene.png": (800, 800), "small.png": (389, 389),
              "strip.png": (389, 250)}
QUESTION = "Classify the image.\nAnswer the question using a single word or phrase."
NEW_TOKENS = 40


def photo(width: int, height: int, seed: int) -> Image.Image:
    """Smooth gradients plus noise: resampling sees real structure, not flat colour."""
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([255 * rows / height, 255 * columns / width, 127 + 100 * np.sin((rows + columns) / 50)], -1)
    noise = rng.normal(0, 20, (height, width, 1)).astype(np.float32)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def demo_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo_images")
    for seed, (name, (width, height)) in enumerate(DEMO_SIZES.items()):
        photo(width, height, seed).save(folder / name, quality=90)
    return folder


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "student_hf"
    assert main(["--checkpoint", str(trained_run), "--out", str(out), "--merge-lora"]) == 0
    return out


def load_processor(folder: Path):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(folder))
    assert type(processor.image_processor).__name__ == "LlavaImageProcessorPil", (
        "transformers chose its torchvision backend (torchvision is installed): its bicubic resize is not PIL's; "
        "load with AutoProcessor.from_pretrained(folder, backend='pil')")
    return processor


def conversation(question: str) -> list[dict]:
    return [{"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": "A red ship near the harbour."},
            {"from": "human", "value": "Is there a plane?"}, {"from": "gpt", "value": "no"}]


def as_messages(turns: list[dict]) -> list[dict]:
    """GeoChat's turns as transformers chat messages, the image as an image item of the first user turn."""
    messages = []
    for index, turn in enumerate(turns):
        text = turn["value"].replace("<image>\n", "")
        content = [{"type": "text", "text": text}]
        if index == 0:
            content.insert(0, {"type": "image"})
        messages.append({"role": "user" if turn["from"] == "human" else "assistant", "content": content})
    return messages


def test_exported_processor_reproduces_the_training_loader_and_the_prompts(exported, demo_images, tmp_path):
    """On GeoChat's demo photo sizes, AutoProcessor(images, text) gives the training loader's pixel_values (bit for
    bit, <= 1e-6 asked) and input_ids, and the chat templates render GeoChat's llava_v1 / vicuna_v1 prompts."""
    from data_prep.__main__ import main as data_prep

    from kd_pipeline.config import DataConfig
    from kd_pipeline.data import build_eval_loader
    from kd_pipeline.eval.generate import encode_question
    from kd_pipeline.prompts import render, render_eval_prompt
    from kd_pipeline.tokenizer import image_token_id, load_tokenizer

    names = list(DEMO_SIZES)
    records = [{"id": index, "image": name, "conversations": conversation(f"Photo {index}: what is shown?")}
               for index, name in enumerate(names)]
    (tmp_path / "instruct.json").write_text(json.dumps(records))
    assert data_prep(["shard", "--instruct", str(tmp_path / "instruct.json"), "--images", str(demo_images), "--out",
                      str(tmp_path / "shards"), "--val-fraction", "0", "--workers", "1"]) == 0
    tokenizer = load_tokenizer(exported)
    loader = build_eval_loader(DataConfig(shards=str(tmp_path / "shards"), template="vicuna_v1", num_workers=0),
                               split="train", tokenizer=tokenizer, image_size=56, num_image_tokens=16,
                               micro_batch_size=1, rank=0, world_size=1)
    processor = load_processor(exported)

    seen = []
    for batch in loader:
        (key,) = batch["keys"]
        record = records[int(key)]
        image = Image.open(demo_images / record["image"]).convert("RGB")
        text = processor.apply_chat_template(as_messages(record["conversations"]), chat_template="vicuna_v1")
        assert text == render(record["conversations"], "vicuna_v1")
        inputs = processor(images=image, text=text, return_tensors="pt")
        assert inputs["pixel_values"].shape == batch["pixel_values"].shape == (1, 3, 56, 56)
        assert (inputs["pixel_values"] - batch["pixel_values"]).abs().max() <= 1e-6, record["image"]
        assert inputs["input_ids"][0].tolist() == batch["input_ids"][0].tolist(), record["image"]

        prompt = processor.apply_chat_template(as_messages(record["conversations"][:1]), add_generation_prompt=True)
        question = record["conversations"][0]["value"].removeprefix("<image>\n")
        assert prompt == render_eval_prompt(question)  # llava_v1, the default template
        ids = processor(images=image, text=prompt)["input_ids"][0]
        assert ids == encode_question(question, tokenizer, image_token_id(tokenizer), 16)
        seen.append(record["image"])
    assert sorted(seen) == sorted(names)


def test_generate_on_the_export_reproduces_eval_run_token_for_token(exported, demo_images, tmp_path, monkeypatch):
    """``model.generate`` with the export's processor and generation_config.json gives the answers ``eval run``
    writes, and the same token ids (captured inside eval run), on the demo photo sizes. Both sides cap answers at
    ``NEW_TOKENS`` (the barely trained model never stops by itself; 256 tokens would only cost time); the export's
    own default is asserted to be eval run's."""
    from transformers import LlavaForConditionalGeneration

    from kd_pipeline.eval import generate as eval_generate
    from kd_pipeline.eval.run import main as eval_run

    data = tmp_path / "bench"
    (data / "images").mkdir(parents=True)
    questions = []
    for index, name in enumerate(DEMO_SIZES):
        shutil.copyfile(demo_images / name, data / "images" / name)
        questions.append({"question_id": f"q{index}", "image": name, "prompt": QUESTION, "ground_truth": "harbor"})
    (data / "aid.jsonl").write_text("".join(json.dumps(question) + "\n" for question in questions))
    captured: list[list[int]] = []
    decode = eval_generate.decode_answer

    def recording_decode(new_token_ids, tokenizer, eos_id):
        captured.append(list(new_token_ids))
        return decode(new_token_ids, tokenizer, eos_id)

    monkeypatch.setattr(eval_generate, "decode_answer", recording_decode)
    assert eval_run(["--model", f"student={exported}", "--tasks", "aid", "--data", str(data), "--out",
                     str(tmp_path / "eval"), "--device", "cpu", "--no-latency", "--no-meteor",
                     "--max-new-tokens", str(NEW_TOKENS)]) == 0
    answers = [json.loads(line) for line in (tmp_path / "eval" / "answers" / "student" / "aid.jsonl").read_text()
               .splitlines()]
    assert [answer["question_id"] for answer in answers] == [question["question_id"] for question in questions]

    def up_to_eos(ids: list[int]) -> list[int]:
        return ids[:ids.index(2) + 1] if 2 in ids else ids

    processor = load_processor(exported)
    model = LlavaForConditionalGeneration.from_pretrained(str(exported)).eval()
    settings = model.generation_config
    assert (settings.do_sample, settings.num_beams, settings.eos_token_id, settings.pad_token_id,
            settings.max_new_tokens) == (False, 1, 2, 0, eval_generate.MAX_NEW_TOKENS)
    for question, answer, eval_ids in zip(questions, answers, captured, strict=True):
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question["prompt"]}]}],
            add_generation_prompt=True)
        image = Image.open(data / "images" / question["image"]).convert("RGB")
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=NEW_TOKENS)
        new_ids = output[0, inputs["input_ids"].shape[1]:].tolist()
        assert up_to_eos(new_ids) == up_to_eos(eval_ids) and new_ids, question["image"]
        text = processor.tokenizer.decode([i for i in up_to_eos(new_ids) if i != 2], skip_special_tokens=True)
        assert text.strip() == answer["answer"]
