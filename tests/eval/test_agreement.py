"""`python -m kd_pipeline.eval agreement` against an independent computation: plain-text tokenization of prompt +
answer, transformers' full forward of each model one question at a time, fp64 formulas written out token by token."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from data_prep import bench, synth
from kd_pipeline.config import ModelConfig
from kd_pipeline.eval.__main__ import main as eval_cli
from kd_pipeline.eval.agreement import COLOUR_WORDS
from kd_pipeline.eval.generate import encode_question, load_eval_model, load_pixels
from kd_pipeline.eval.records import read_jsonl
from kd_pipeline.models import build_model, num_image_tokens
from kd_pipeline.prompts import expand_image, render_eval_prompt, tokenize_with_image
from kd_pipeline.tokenizer import image_token_id, save_tokenizer

TASKS = {"aid": "scene", "lrben": "vqa", "region_captioning": "region_captioning"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    world = tmp_path_factory.mktemp("agreement_world")
    assert synth.main(["--out", str(world), "--num", "2", "--bench-num", "6", "--pt-lines", "1", "--seed", "3",
                       "--profile", "repro"]) == 0
    out = tmp_path_factory.mktemp("agreement_bench")
    for task, source in TASKS.items():
        assert bench.main(["--task", task, "--questions", str(world / "bench" / f"{source}.jsonl"), "--images",
                           str(world / "bench" / "images"), "--out", str(out)]) == 0
    return out


def save_model(folder: Path, tokenizer, tokenizer_dir, seed: int, hidden_size: int) -> Path:
    torch.manual_seed(seed)
    model = build_model(ModelConfig(hidden_size=hidden_size, attn_implementation="eager"), vocab_size=len(tokenizer),
                        image_token_id=image_token_id(tokenizer))
    model.save_pretrained(str(folder))
    save_tokenizer(tokenizer, folder, source_dir=tokenizer_dir)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer, tokenizer_dir) -> tuple[Path, Path]:
    return (save_model(tmp_path_factory.mktemp("teacher"), tokenizer, tokenizer_dir, 1, 96),
            save_model(tmp_path_factory.mktemp("student"), tokenizer, tokenizer_dir, 2, 64))


def reference(teacher_dir: Path, student_dir: Path, data_dir: Path, task: str) -> dict[str, dict[str, float]]:
    device = torch.device("cpu")
    teacher, student = (load_eval_model(folder, device, torch.float32) for folder in (teacher_dir, student_dir))
    tokenizer, image_id = student.tokenizer, student.image_token_id
    totals = {group: {"nll": 0.0, "kl": 0.0, "top1": 0.0, "tokens": 0} for group in ("all", "decision")}
    for question in read_jsonl(data_dir / f"{task}.jsonl"):
        answer = str(question["ground_truth"])
        prompt_ids = encode_question(question["prompt"], tokenizer, image_id, student.num_image_tokens)
        text = render_eval_prompt(question["prompt"]) + " " + answer + "</s>"
        full_ids, _ = expand_image(*(2 * [tokenize_with_image(text, tokenizer, image_id)]), image_id,
                                   student.num_image_tokens)
        pixels = load_pixels([data_dir / "images" / question["image"]], student.image_size)
        with torch.no_grad():
            teacher_logits, student_logits = (model.model(input_ids=torch.tensor([full_ids]), pixel_values=pixels)
                                              .logits[0].double() for model in (teacher, student))
        answer_ids = full_ids[len(prompt_ids):]
        pieces = tokenizer.convert_ids_to_tokens(answer_ids)
        if task == "region_captioning":  # the first word-initial piece from which the text reads a colour word
            decision = next((index for index, piece in enumerate(pieces) if piece.startswith("▁") and
                             tokenizer.decode(answer_ids[index:]).strip().split()[0].strip(",.") in COLOUR_WORDS),
                            None)
        else:
            decision = 0
        for offset, token in enumerate(answer_ids):
            position = len(prompt_ids) + offset - 1
            p_t = torch.softmax(teacher_logits[position], -1)
            p_s = torch.softmax(student_logits[position], -1)
            values = {"nll": -math.log(float(p_s[token])),
                      "kl": float(sum(p_t[v] * (math.log(p_t[v]) - math.log(p_s[v])) for v in range(len(p_t)))),
                      "top1": float(int(p_t.argmax()) == int(p_s.argmax()))}
            for group in ("all", "decision"):
                if group == "all" or offset == decision:
                    for name, value in values.items():
                        totals[group][name] += value
                    totals[group]["tokens"] += 1
    return {group: {name: value / values["tokens"] for name, value in values.items() if name != "tokens"}
            for group, values in totals.items()}


def test_agreement_cli_equals_an_independent_computation(models, data_dir, capsys):
    teacher_dir, student_dir = models
    assert eval_cli(["agreement", "--teacher", str(teacher_dir), "--student", str(student_dir), "--data",
                     str(data_dir), "--tasks", ",".join(TASKS), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    for task in TASKS:
        expected = reference(teacher_dir, student_dir, data_dir, task)
        for group in ("all", "decision"):
            for name in ("nll", "kl", "top1"):
                assert results[task][group][name] == pytest.approx(expected[group][name], abs=2e-4), (task, group, name)
            assert results[task][group][f"{name}_se"] >= 0.0
    assert results["aid"]["decision"]["questions"] == results["aid"]["all"]["questions"] == 6


def test_agreement_with_itself_is_perfect_and_bad_input_exits_2(models, data_dir, capsys, tmp_path):
    teacher_dir, _ = models
    assert eval_cli(["agreement", "--teacher", str(teacher_dir), "--student", str(teacher_dir), "--data",
                     str(data_dir), "--tasks", "aid", "--json"]) == 0
    same = json.loads(capsys.readouterr().out)["aid"]["all"]
    assert same["kl"] == pytest.approx(0.0, abs=1e-9) and same["top1"] == 1.0
    assert eval_cli(["agreement", "--teacher", str(tmp_path), "--student", str(teacher_dir), "--data",
                     str(data_dir)]) == 2
    assert "has no config.json" in capsys.readouterr().err
    assert eval_cli(["agreement", "--teacher", str(teacher_dir), "--student", str(teacher_dir), "--data",
                     str(tmp_path), "--tasks", "aid"]) == 2
    assert "aid.jsonl does not exist" in capsys.readouterr().err
