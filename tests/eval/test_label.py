"""`python -m kd_pipeline.eval label` (sequence-level KD's pseudo-labels) against an independent greedy decode: the
training template rendered by hand, transformers' full forward one prompt at a time, argmax token by token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data_prep import synth
from kd_pipeline.eval.__main__ import main as eval_cli
from kd_pipeline.eval.generate import load_eval_model, load_pixels
from kd_pipeline.prompts import expand_image, tokenize_with_image
from tests.eval.test_agreement import save_model

MAX_NEW = 6


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    world = tmp_path_factory.mktemp("label_world")
    assert synth.main(["--out", str(world), "--num", "5", "--bench-num", "2", "--pt-lines", "1", "--seed", "4",
                       "--profile", "repro"]) == 0
    return world


def reference_answer(model, record: dict) -> str:
    """Greedy decoding without a KV cache: the vicuna_v1 prompt typed out, one full forward per new token, the
    <image> id never chosen."""
    tokenizer = model.tokenizer
    question = record["conversations"][0]["value"].replace("<image>", "").strip()
    text = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
            f"detailed, and polite answers to the user's questions. USER: <image>\n{question} ASSISTANT:")
    ids = tokenize_with_image(text, tokenizer, model.image_token_id)
    ids = expand_image(ids, ids, model.image_token_id, model.num_image_tokens)[0]
    pixels = load_pixels([record["_image_path"]], model.image_size)
    new = []
    with torch.no_grad():
        for _ in range(MAX_NEW):
            logits = model.model(input_ids=torch.tensor([ids + new]), pixel_values=pixels).logits[0, -1]
            logits[model.image_token_id] = -float("inf")  # label never answers with <image>
            token = int(logits.argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def test_label_answers_each_prompt_as_a_plain_greedy_decode_would(world, tokenizer, tokenizer_dir, tmp_path):
    model_dir = save_model(tmp_path / "teacher", tokenizer, tokenizer_dir, 5, 96)
    records = json.loads((world / "instruct.json").read_text())
    prompts = [{**records[0], "conversations": records[0]["conversations"][:1]}, *records[1:]]  # one bare prompt
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    out = tmp_path / "labelled.json"
    assert eval_cli(["label", "--model", str(model_dir), "--instruct", str(tmp_path / "prompts.json"), "--images",
                     str(world / "images"), "--out", str(out), "--max-new-tokens", str(MAX_NEW),
                     "--batch-size", "2"]) == 0
    labelled = {record["id"]: record for record in json.loads(out.read_text())}
    model = load_eval_model(model_dir, torch.device("cpu"), torch.float32)
    expected = {record["id"]: reference_answer(model, {**record, "_image_path": world / "images" / record["image"]})
                for record in prompts}
    assert set(labelled) == {key for key, answer in expected.items() if answer}  # empty answers are left out
    assert labelled, "the random model answered nothing: the comparison would be empty"
    for key, record in labelled.items():
        human, answer = record["conversations"]
        assert human == prompts[[p["id"] for p in prompts].index(key)]["conversations"][0]
        assert answer == {"from": "gpt", "value": expected[key]}  # the original answer is replaced


def test_label_refuses_unusable_input_with_one_line(world, tmp_path, capsys):
    (tmp_path / "no_human.json").write_text(json.dumps([{"id": 1, "image": "x.png", "conversations": []}]))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    for instruct, message in (("missing.json", "does not exist"), ("no_human.json", "has no human turn")):
        assert eval_cli(["label", "--model", str(tmp_path / "model"), "--instruct", str(tmp_path / instruct),
                         "--images", str(world / "images"), "--out", str(tmp_path / "o.json")]) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and message in error[0] and "Traceback" not in error[0]
    assert not (tmp_path / "o.json").exists()
